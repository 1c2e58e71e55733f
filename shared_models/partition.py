"""Split a model's state_dict into shared and site-local keys, by module type.

A policy is a set of tensor roles (see :class:`TensorRole`) that stay at the
site. Each state_dict key is owned by the innermost registered norm module above
it; that module's type says the key's role. Keys under no norm module are
ordinary weights and are shared (except under the ``local`` policy). A module
that looks like a normalization but is not registered is an error: silently
sharing its statistics would defeat the purpose of FedBN/SiloBN.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from .norms.registry import TensorRole, looks_like_norm, norm_type_of

ALL_ROLES = frozenset(TensorRole)

POLICY_LOCAL_ROLES: Mapping[str, frozenset[TensorRole]] = {
    "fedavg": frozenset(),
    # Every tensor of every norm layer stays local, except DualNorm's modulation convs: they are
    # ordinary conv weights and methods.md §1.6 averages them by default (a "personalized"
    # variant keeps them local via Policy.parse("fedbn", {"modulation": "local"})).
    "fedbn": ALL_ROLES - {TensorRole.MODULATION},
    "silobn": frozenset({TensorRole.STATISTIC}),  # statistics local, affine shared
    "local": ALL_ROLES,  # nothing shared at all (see Policy.everything_local)
}


#: whole layers a policy can keep at the site besides its norm roles, by position in the network:
#: "stem", the first convolution, which sees the scanner's raw intensities (PartialFed, LG-FedAvg),
#: and "head", the last one, which maps features to the site's labels (FedPer)
LAYERS = ("stem", "head")


class PartitionError(ValueError):
    """The model contains a tensor the partition cannot classify."""


@dataclass(frozen=True)
class Policy:
    """Which roles stay at the site; ``overrides`` flips single roles.

    ``Policy.parse("fedbn", {"mixing": "shared"})`` keeps all norm tensors local
    except Switchable Norm's importance weights, which are averaged.
    """

    name: str
    local_roles: frozenset[TensorRole]
    everything_local: bool = False
    local_layers: frozenset[str] = frozenset()  # of LAYERS

    @classmethod
    def parse(cls, name: str, overrides: Mapping[str, str] | None = None) -> Policy:
        if name not in POLICY_LOCAL_ROLES:
            raise PartitionError(f"unknown policy {name!r} (known: {', '.join(POLICY_LOCAL_ROLES)})")
        roles, layers = set(POLICY_LOCAL_ROLES[name]), set()
        for key, where in (overrides or {}).items():
            if where not in ("local", "shared"):
                raise PartitionError(f"policy override {key}: expected 'local' or 'shared', got {where!r}")
            chosen, item = (layers, key) if key in LAYERS else (roles, _role(key))
            (chosen.add if where == "local" else chosen.discard)(item)
        return cls(name=name, local_roles=frozenset(roles), everything_local=name == "local", local_layers=frozenset(layers))


def _role(name: str) -> TensorRole:
    try:
        return TensorRole(name)
    except ValueError as exc:
        known = ", ".join([*(r.value for r in TensorRole), *LAYERS])
        raise PartitionError(f"policy override: unknown role {name!r} (known: {known})") from exc


def layer_keys(model: nn.Module, layer: str) -> frozenset[str]:
    """The state_dict keys of the network's first ("stem") or last ("head") convolution."""
    convs = [path for path, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise PartitionError(f"policy keeps the {layer} local, but the model has no convolution")
    path = convs[0] if layer == "stem" else convs[-1]
    return frozenset(k for k in model.state_dict() if k.rsplit(".", 1)[0] == path)


@dataclass(frozen=True)
class Split:
    """Disjoint, complete split of a state_dict's keys (sorted tuples)."""

    shared: tuple[str, ...]
    local: tuple[str, ...]
    roles: Mapping[str, TensorRole | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        overlap = set(self.shared) & set(self.local)
        if overlap:
            raise PartitionError(f"keys both shared and local: {sorted(overlap)[:5]}")


def _owner_chain(key: str) -> Iterable[str]:
    """Module paths that own ``key``, innermost first ("a.b.w" -> "a.b", "a", "")."""
    parts = key.split(".")[:-1]
    for depth in range(len(parts), -1, -1):
        yield ".".join(parts[:depth])


def tensor_roles(model: nn.Module) -> dict[str, TensorRole | None]:
    """Role of every state_dict key (``None`` = ordinary, non-norm tensor)."""
    # Every path, not only the first: a module reachable twice (MONAI's DynUNet) has state_dict keys under each.
    modules = dict(model.named_modules(remove_duplicate=False))
    roles: dict[str, TensorRole | None] = {}
    for key in model.state_dict():
        role: TensorRole | None = None
        classified = False
        for owner_path in _owner_chain(key):
            owner = modules[owner_path]
            norm_type = norm_type_of(owner)
            if norm_type is None:
                continue
            relative = key[len(owner_path) + 1 :] if owner_path else key
            role = norm_type.role_of(relative)
            if role is None:
                raise PartitionError(
                    f"{key}: norm module {owner_path or '<root>'} ({type(owner).__name__}) "
                    f"does not declare a role for its tensor {relative!r}"
                )
            classified = True
            break
        if not classified:
            direct_owner = modules[key.rsplit(".", 1)[0]] if "." in key else model
            if looks_like_norm(direct_owner):
                raise PartitionError(
                    f"{key}: module type {type(direct_owner).__module__}.{type(direct_owner).__name__} looks like a "
                    "normalization layer but is not registered; register it with "
                    "shared_models.norms.register_norm_type so its site-local tensors are known"
                )
        roles[key] = role
    return roles


def partition(model: nn.Module, policy: str | Policy) -> Split:
    """Shared and local state_dict keys of ``model`` under ``policy``."""
    pol = Policy.parse(policy) if isinstance(policy, str) else policy
    roles = tensor_roles(model)
    kept_layers = frozenset().union(*(layer_keys(model, layer) for layer in pol.local_layers))
    shared, local = [], []
    for key, role in roles.items():
        is_local = pol.everything_local or key in kept_layers or (role is not None and role in pol.local_roles)
        (local if is_local else shared).append(key)
    return Split(shared=tuple(sorted(shared)), local=tuple(sorted(local)), roles=roles)
