"""SelfReg-UNet regularisers (Zhu et al., MICCAI 2024; methods.md §3) as a training-time loss.

Two terms, no parameters, no buffers:

* ``inter`` (semantic consistency): a student feature and the *detached* teacher
  (last decoder feature before the classifier) are pooled to a common size, ``k =
  min(C_s, C_t)`` channels are drawn at random from each (without replacement,
  fresh at every call), and their MSE is taken;
* ``intra`` (internal feature distillation): channels are sorted by the mean of
  their L2-normalised spatial maps, and the first half is regressed onto the
  second half (both halves get gradients).

``L_KD = weight * [mean_E intra + mean_D intra + mean_{E+D} inter(f, teacher)]``.

Features are captured by forward hooks that exist only for the duration of one
training forward pass (:class:`FeatureTap`), so the network keeps returning plain
logits and inference costs nothing extra. A network declares its taps with
``selfreg_features(self) -> (encoder_modules, decoder_modules, teacher_module)``;
:func:`residual_unet_feature_modules` supplies them for ``ResidualUNet``.

Differences from the authors' code, on purpose: spatial matching pools to the
per-axis minimum (the code assumes square maps), and an odd channel count drops
the lowest-ranked channel in ``intra`` (the code would fail).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .nets.unet import ResidualUNet

__all__ = [
    "DEFAULT_WEIGHT",
    "RECIPE_WEIGHTS",
    "FeatureTap",
    "SelfRegFeatures",
    "SelfRegLoss",
    "SelfRegStep",
    "disable_selfreg",
    "enable_selfreg",
    "feature_modules",
    "inter_loss",
    "intra_loss",
    "random_channel_pairs",
    "residual_unet_feature_modules",
    "selfreg_term",
    "selfreg_training_step",
]

# KD weight lambda of the authors' recipes (methods.md §3.3, [CODE]).
RECIPE_WEIGHTS: dict[str, float] = {"synapse-unet": 0.015, "synapse-swin-unet": 0.010, "acdc-unet": 0.1}
DEFAULT_WEIGHT = RECIPE_WEIGHTS["synapse-unet"]

IndexSampler = Callable[[int, int, "torch.Generator | None"], tuple[torch.Tensor, torch.Tensor]]
FeatureModules = tuple[list[nn.Module], list[nn.Module], nn.Module]


# ----------------------------------------------------------------- the two terms
def random_channel_pairs(c_student: int, c_teacher: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k = min(C_s, C_t) distinct indices from each side, drawn independently and uniformly."""
    k = min(c_student, c_teacher)
    return torch.randperm(c_student, generator=generator)[:k], torch.randperm(c_teacher, generator=generator)[:k]


def _pool_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape[2:]) == size:
        return x
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(size)]
    return pool(x, size)


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger map down to the smaller one (per-axis minimum)."""
    size = tuple(min(a, b) for a, b in zip(student.shape[2:], teacher.shape[2:]))
    return _pool_to(student, size), _pool_to(teacher, size)


def inter_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    generator: torch.Generator | None = None,
    sampler: IndexSampler | None = None,
) -> torch.Tensor:
    """Semantic-consistency term: MSE between randomly paired channels, teacher detached."""
    s, t = match_spatial(student, teacher.detach())
    idx_s, idx_t = (sampler or random_channel_pairs)(s.shape[1], t.shape[1], generator)
    return F.mse_loss(s[:, idx_s.to(s.device)], t[:, idx_t.to(t.device)])


def channel_ranking(feature: torch.Tensor) -> torch.Tensor:
    """Channel indices by decreasing mean of the L2-normalised spatial maps (stable for ties)."""
    with torch.no_grad():
        maps = F.normalize(feature.detach().float().flatten(2), dim=2)
        score = maps.mean(dim=(0, 2))
        return torch.argsort(score, descending=True, stable=True)


def intra_loss(feature: torch.Tensor) -> torch.Tensor:
    """Internal-distillation term: MSE(first half, second half) of the ranked channels.

    With an odd channel count the lowest-ranked channel is dropped, so the term
    stays invariant to the channel order of the input.
    """
    half = feature.shape[1] // 2
    if half == 0:
        return feature.new_zeros(())
    ranked = feature[:, channel_ranking(feature).to(feature.device)]
    return F.mse_loss(ranked[:, :half], ranked[:, half : 2 * half])


# ----------------------------------------------------------------- the total term
@dataclass
class SelfRegFeatures:
    """Features of one training forward pass: encoder set E, decoder set D, teacher."""

    encoder: list[torch.Tensor]
    decoder: list[torch.Tensor]
    teacher: torch.Tensor


def _mean(terms: Sequence[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack([t.float() for t in terms]).mean() if terms else None


def selfreg_term(
    features: SelfRegFeatures,
    generator: torch.Generator | None = None,
    sampler: IndexSampler | None = None,
    use_intra: bool = True,
    use_inter: bool = True,
) -> torch.Tensor:
    """Unweighted ``mean_E intra + mean_D intra + mean_{E+D} inter(f, teacher)``; empty sets are skipped."""
    parts: list[torch.Tensor | None] = []
    if use_intra:
        parts += [_mean([intra_loss(f) for f in features.encoder]), _mean([intra_loss(f) for f in features.decoder])]
    if use_inter:
        students = [*features.decoder, *features.encoder]
        parts.append(_mean([inter_loss(f, features.teacher, generator, sampler) for f in students]))
    present = [p for p in parts if p is not None]
    return torch.stack(present).sum() if present else features.teacher.new_zeros((), dtype=torch.float32)


class SelfRegLoss(nn.Module):
    """``base_loss(logits, labels) + weight * L_KD(features)``.

    Args:
        base_loss: the segmentation loss (e.g. Dice + CE).
        weight: lambda; default 0.015 is the authors' CNN U-Net Synapse recipe
            (ACDC U-Net used 0.1, Swin-UNet 0.010; see ``RECIPE_WEIGHTS``).
        generator: RNG for the channel pairing; None uses torch's global RNG (the
            client's seeded RNG). Seed it for reproducible runs.
        sampler: replaces :func:`random_channel_pairs` (tests, ablations).

    With ``weight == 0`` or no features the result *is* the base loss.
    """

    def __init__(
        self,
        base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        weight: float = DEFAULT_WEIGHT,
        generator: torch.Generator | None = None,
        sampler: IndexSampler | None = None,
        use_intra: bool = True,
        use_inter: bool = True,
    ):
        super().__init__()
        if weight < 0:
            raise ValueError(f"SelfReg weight must be >= 0, got {weight}")
        self.base_loss = base_loss
        self.weight = float(weight)
        self.generator = generator
        self.sampler = sampler
        self.use_intra, self.use_inter = use_intra, use_inter

    def regularizer(self, features: SelfRegFeatures) -> torch.Tensor:
        """The weighted SelfReg term alone."""
        term = selfreg_term(features, self.generator, self.sampler, self.use_intra, self.use_inter)
        return self.weight * term

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, features: SelfRegFeatures | None = None) -> torch.Tensor:
        base = self.base_loss(logits, labels)
        if features is None or self.weight == 0.0:
            return base
        return base + self.regularizer(features)


# ----------------------------------------------------------------- capturing features
def residual_unet_feature_modules(model: ResidualUNet) -> FeatureModules:
    """ResidualUNet taps: E = downs, D = ups[:-1], teacher = ups[-1] (methods.md §3.2)."""
    return list(model.downs), list(model.ups[:-1]), model.ups[-1]


def feature_modules(model: nn.Module) -> FeatureModules:
    """The (encoder, decoder, teacher) modules a network declares for SelfReg."""
    declared = getattr(model, "selfreg_features", None)
    if callable(declared):
        return declared()
    if isinstance(model, ResidualUNet):
        return residual_unet_feature_modules(model)
    raise TypeError(
        f"{type(model).__name__} does not declare SelfReg features; add a method "
        "selfreg_features(self) -> (encoder_modules, decoder_modules, teacher_module)"
    )


class FeatureTap:
    """Context manager: forward hooks on the declared modules, removed on exit.

    Outputs of the last call of each module inside the ``with`` block are kept
    (with their autograd graph) and returned by :meth:`features`.
    """

    def __init__(self, model: nn.Module):
        self.encoder_modules, self.decoder_modules, self.teacher_module = feature_modules(model)
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> FeatureTap:
        self._outputs.clear()
        modules = [*self.encoder_modules, *self.decoder_modules, self.teacher_module]
        for slot, module in enumerate(modules):
            self._handles.append(module.register_forward_hook(self._hook(slot)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, slot: int) -> Callable[..., None]:
        def store(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"SelfReg tap on {type(module).__name__}: expected a tensor output, got {type(output).__name__}")
            self._outputs[slot] = output

        return store

    def features(self) -> SelfRegFeatures:
        """The captured features; clears the tap so no tensor outlives the step."""
        n_enc, n_dec = len(self.encoder_modules), len(self.decoder_modules)
        missing = [s for s in range(n_enc + n_dec + 1) if s not in self._outputs]
        if missing:
            raise RuntimeError(f"SelfReg: {len(missing)} declared feature module(s) did not run in the forward pass")
        out = [self._outputs[s] for s in range(n_enc + n_dec + 1)]
        self._outputs.clear()
        return SelfRegFeatures(encoder=out[:n_enc], decoder=out[n_enc : n_enc + n_dec], teacher=out[-1])


# ----------------------------------------------------------------- trainer integration
StepFn = Callable[..., None]


def selfreg_training_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    step: StepFn,
    weight: float = DEFAULT_WEIGHT,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Forward with taps, base loss + SelfReg, ``step(loss)``; returns the detached loss.

    ``loss_fn`` may already be a :class:`SelfRegLoss` (its weight and RNG win);
    otherwise it is wrapped with ``weight`` and ``generator``.
    """
    criterion = loss_fn if isinstance(loss_fn, SelfRegLoss) else SelfRegLoss(loss_fn, weight, generator)
    with FeatureTap(model) as tap:
        logits = model(images)
    loss = criterion(logits, labels, tap.features())
    step(loss)
    return loss.detach()


class SelfRegStep:
    """``training_step(images, labels, loss_fn, step)`` bound to one model (the trainer's hook).

    Holds its own ``torch.Generator`` seeded with ``seed`` (None: torch's global RNG).
    """

    def __init__(self, model: nn.Module, weight: float = DEFAULT_WEIGHT, seed: int | None = None):
        feature_modules(model)  # fail now, not at the first batch
        self.model = model
        self.weight = float(weight)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: Callable[..., torch.Tensor], step: StepFn) -> torch.Tensor:
        return selfreg_training_step(self.model, images, labels, loss_fn, step, self.weight, self.generator)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["generator"] = self.generator.get_state() if self.generator is not None else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        rng_state = state.pop("generator")
        self.__dict__.update(state)
        self.generator = None
        if rng_state is not None:
            self.generator = torch.Generator()
            self.generator.set_state(rng_state)


def enable_selfreg(model: nn.Module, weight: float = DEFAULT_WEIGHT, seed: int | None = None) -> nn.Module:
    """Attach ``model.training_step`` (not a submodule: state_dict and fingerprint are unchanged).

    A model that already has its own ``training_step`` (e.g. DualNorm-UNet's dual
    forward) is refused rather than silently overridden.
    """
    existing = getattr(model, "training_step", None)
    if existing is not None and not isinstance(existing, SelfRegStep):
        raise ValueError(f"{type(model).__name__} already defines training_step; SelfReg would replace it")
    model.training_step = SelfRegStep(model, weight, seed)
    return model


def disable_selfreg(model: nn.Module) -> nn.Module:
    """Remove the attached training step, if any."""
    if isinstance(model.__dict__.get("training_step"), SelfRegStep):
        del model.__dict__["training_step"]
    return model
