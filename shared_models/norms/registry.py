"""Normalization registry: names -> layer factories, module types -> tensor roles.

Two tables live here, on purpose separate:

* ``NORMS`` maps a config name (``"batch"``, ``"group"``, ...) to a factory
  ``factory(num_features, spatial_dims, **options) -> nn.Module``. This is what
  networks call to build their norm layers.
* ``NORM_TYPES`` maps a module *class* to the role of each tensor it owns
  (running statistic, affine, mixing weight, ...). This is what
  :func:`shared_models.partition.partition` consults to decide which tensors stay
  at a site. It is keyed by type, never by parameter name, so it also covers
  networks we did not write (MONAI's ``adn.N.*`` keys contain no ``"bn"``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from torch import nn


class TensorRole(str, Enum):
    """What a tensor of a normalization layer is; policies choose by role."""

    STATISTIC = "statistic"  # running mean/var, counters: describe a site's data
    AFFINE = "affine"  # per-channel scale/shift (gamma, beta)
    MIXING = "mixing"  # learned choice between normalizers (SN lambda, ILN/BIN rho)
    MODULATION = "modulation"  # learned maps producing spatial gamma/beta (DualNorm)


@dataclass(frozen=True)
class OptimRule:
    """How the local optimizer treats some tensors of a norm layer (e.g. BIN's rho: 10x lr, no weight decay)."""

    lr_multiplier: float = 1.0
    weight_decay: float | None = None  # None: the optimizer's weight decay


class NormRegistryError(ValueError):
    """A norm name or type is unknown, or registered twice."""


@dataclass(frozen=True)
class NormEntry:
    """A buildable normalization: its factory and a one-line description."""

    name: str
    factory: Callable[..., nn.Module]
    description: str
    batch_independent: bool  # safe with batch size 1 in training


@dataclass(frozen=True)
class NormType:
    """Roles of the tensors owned by (the subtree of) one norm module class.

    ``roles`` maps glob patterns over the tensor name relative to the module
    (e.g. ``"running_*"``, ``"gamma_head.*"``) to a role. A nested module that is
    itself a registered norm type classifies its own tensors.
    """

    cls: type[nn.Module]
    roles: Mapping[str, TensorRole]
    optim: Mapping[str, OptimRule] = field(default_factory=dict)  # glob over parameter names -> rule
    project: Callable[[nn.Module], None] | None = None  # applied to the module after every optimizer step

    def role_of(self, relative_name: str) -> TensorRole | None:
        for pattern, role in self.roles.items():
            if fnmatch.fnmatchcase(relative_name, pattern):
                return role
        return None

    def rule_of(self, relative_name: str) -> OptimRule | None:
        return next((r for pattern, r in self.optim.items() if fnmatch.fnmatchcase(relative_name, pattern)), None)


NORMS: dict[str, NormEntry] = {}
NORM_TYPES: dict[type[nn.Module], NormType] = {}

BATCHNORM_ROLES: Mapping[str, TensorRole] = {
    "weight": TensorRole.AFFINE,
    "bias": TensorRole.AFFINE,
    "running_mean": TensorRole.STATISTIC,
    "running_var": TensorRole.STATISTIC,
    "num_batches_tracked": TensorRole.STATISTIC,
}
AFFINE_ROLES: Mapping[str, TensorRole] = {"weight": TensorRole.AFFINE, "bias": TensorRole.AFFINE}


def register_norm(
    name: str,
    factory: Callable[..., nn.Module],
    description: str,
    batch_independent: bool,
) -> None:
    """Register a buildable norm under ``name``; a duplicate name is an error."""
    if name in NORMS:
        raise NormRegistryError(f"norm {name!r} is already registered")
    NORMS[name] = NormEntry(name, factory, description, batch_independent)


def register_norm_type(
    cls: type[nn.Module],
    roles: Mapping[str, TensorRole],
    optim: Mapping[str, OptimRule] | None = None,
    project: Callable[[nn.Module], None] | None = None,
) -> None:
    """Declare the tensor roles of a norm module class (used by ``partition``) and, if the
    method asks for them, its optimizer rules and post-step projection (used by the trainer)."""
    if cls in NORM_TYPES:
        raise NormRegistryError(f"norm type {cls.__name__} is already registered")
    NORM_TYPES[cls] = NormType(cls, dict(roles), dict(optim or {}), project)


def norm_names() -> list[str]:
    """All registered norm names, sorted."""
    return sorted(NORMS)


def build_norm(name: str, num_features: int, spatial_dims: int, **options: object) -> nn.Module:
    """Build the norm ``name`` for ``num_features`` channels in 1/2/3 spatial dims."""
    if name not in NORMS:
        raise NormRegistryError(f"unknown norm {name!r} (registered: {', '.join(norm_names())})")
    if spatial_dims not in (1, 2, 3):
        raise NormRegistryError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    try:
        return NORMS[name].factory(num_features, spatial_dims, **options)
    except TypeError as exc:
        raise NormRegistryError(f"norm {name!r}: bad options {sorted(options)}: {exc}") from exc


def norm_type_of(module: nn.Module) -> NormType | None:
    """The registered norm type of ``module`` (most specific class first)."""
    for klass in type(module).__mro__:
        if klass in NORM_TYPES:
            return NORM_TYPES[klass]
    return None


def looks_like_norm(module: nn.Module) -> bool:
    """Heuristic for *unregistered* norm layers, so they fail loudly.

    A module is suspicious if its class name says ``Norm`` or it carries
    running statistics; such a module must be registered before it can be
    partitioned, because sharing its statistics by default would silently break
    FedBN/SiloBN.
    """
    if "norm" in type(module).__name__.lower():
        return True
    own = {name for name, _ in module.named_buffers(recurse=False)}
    return bool(own & {"running_mean", "running_var"})
