"""DualNorm-UNet (Xiao et al. 2021; methods.md §1.4-1.5): the residual UNet run twice.

Pass 1 is the plain UNet (global BN statistics) and yields logits ``z1``. Pass 2
runs the same network again, but in the blocks named in ``dualnorm_blocks`` the
residual block's ``norm0``/``norm1`` are replaced by parallel
:class:`~shared_models.norms.dualnorm.DualNormLayer` s conditioned on the detached
mask ``softmax(z1)``; every conv and every other norm is shared by both passes.
The prediction is pass 2's ``z2``.

Block names (official code: ``inc, down1..down4, mid, up1..up4``) map onto
:class:`ResidualUNet` with L = len(channels) levels as: ``inc`` -> ``inc``;
``downK`` (1 <= K < L) -> ``downs[K-1].block``; ``upK`` (1 <= K < L, up1 the
deepest) -> ``ups[K-1].block``. Our backbone has no separate bottleneck block,
so ``mid``/``bottom`` alias the deepest down block ``down{L-1}``. The head
never uses DualNorm.

Building reuses the backbone's modules, so for the same seed the shared weights
equal those of ``build_model({"name": "unet", ...})`` with the same config.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..norms.dualnorm import DualNormLayer
from .blocks import ResBlock
from .registry import register_model
from .unet import ResidualUNet, UNetConfig

Stage = Literal["baseline", "dual"]
STAGES: tuple[str, ...] = ("baseline", "dual")


def default_dualnorm_blocks(levels: int) -> tuple[str, ...]:
    """Every encoder block but the deepest: the paper's ``inc, down1..down3`` at 5 levels."""
    return ("inc",) + tuple(f"down{i}" for i in range(1, levels - 1))


def dualnorm_block_paths(names: Sequence[str] | None, levels: int) -> list[str]:
    """Module paths of the residual blocks named ``names`` (``None`` = the default) in a UNet with ``levels`` levels."""
    names = default_dualnorm_blocks(levels) if names is None else names
    paths: list[str] = []
    for name in names:
        match = re.fullmatch(r"(down|up)(\d+)", name)
        if name == "inc":
            path = "inc"
        elif name in ("mid", "bottom"):
            path = f"downs.{levels - 2}.block"
        elif match and 1 <= int(match.group(2)) < levels:
            path = f"{match.group(1)}s.{int(match.group(2)) - 1}.block"
        else:
            allowed = f"inc, down1..down{levels - 1}, mid/bottom, up1..up{levels - 1}"
            raise ValueError(f"dualnorm-blocks: unknown block {name!r} for {levels} levels (allowed: {allowed})")
        if path not in paths:
            paths.append(path)
    return paths


@dataclass(frozen=True)
class DualNormUNetConfig(UNetConfig):
    """:class:`UNetConfig` plus where and how DualNorm acts, and the training stage.

    ``clip_value`` is the clip-by-value applied before the pass-2 step and in the
    baseline path (official: 0.1); ``None`` disables it.
    """

    dualnorm_blocks: tuple[str, ...] | None = None  # None: every encoder block but the deepest
    reduction: int = 2
    mask_mode: Literal["soft", "hard"] = "soft"
    stage: Stage = "dual"
    clip_value: float | None = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {self.stage!r}")
        dualnorm_block_paths(self.dualnorm_blocks, len(self.channels))


class DualResBlock(nn.Module):
    """A :class:`ResBlock` (same modules, same state keys) with parallel DualNorm layers.

    While a mask is set (only inside :meth:`DualNormUNet.local_forward`) the block
    normalizes with ``dual0``/``dual1``; otherwise with its own ``norm0``/``norm1``.
    """

    def __init__(self, block: ResBlock, num_classes: int, spatial_dims: int, reduction: int, mask_mode: str):
        super().__init__()
        channels = block.conv0.in_channels
        self.norm0, self.conv0, self.norm1, self.conv1 = block.norm0, block.conv0, block.norm1, block.conv1
        self.dual0 = DualNormLayer(channels, num_classes, spatial_dims, reduction=reduction, mask_mode=mask_mode)
        self.dual1 = DualNormLayer(channels, num_classes, spatial_dims, reduction=reduction, mask_mode=mask_mode)
        self._mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if mask is None:
            h = self.conv0(F.relu(self.norm0(x)))
            return x + self.conv1(F.relu(self.norm1(h)))
        h = self.conv0(F.relu(self.dual0(x, mask)))
        return x + self.conv1(F.relu(self.dual1(h, mask)))


StepFn = Callable[..., None]  # step(loss, clip_value=None): backward, optional clip, optimizer step, zero_grad
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DualNormUNet(ResidualUNet):
    """Residual UNet with a global pass and a mask-conditioned (global + local) pass.

    ``forward(x, mask)`` runs pass 2 with the given mask. ``forward(x)`` runs pass 1
    in training mode or in the ``baseline`` stage, and the full dual inference
    (pass 1 -> detached softmax -> pass 2, returning ``z2``) in eval mode.
    """

    def __init__(self, cfg: DualNormUNetConfig):
        super().__init__(cfg)
        self.dualnorm_paths = tuple(dualnorm_block_paths(cfg.dualnorm_blocks, len(cfg.channels)))
        for path in self.dualnorm_paths:
            parent_path, _, child = path.rpartition(".")
            parent = self.get_submodule(parent_path) if parent_path else self
            dual = DualResBlock(getattr(parent, child), cfg.out_channels, cfg.spatial_dims, cfg.reduction, cfg.mask_mode)
            setattr(parent, child, dual)
        self.clip_value = cfg.clip_value
        self.stage = cfg.stage

    @property
    def stage(self) -> str:
        """``"baseline"``: train/infer pass 1 only (stage 1); ``"dual"``: the two-pass recipe."""
        return self._stage

    @stage.setter
    def stage(self, value: str) -> None:
        if value not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {value!r}")
        self._stage = value

    def dual_blocks(self) -> list[DualResBlock]:
        """The residual blocks that carry DualNorm layers."""
        return [self.get_submodule(path) for path in self.dualnorm_paths]  # type: ignore[misc]

    @contextmanager
    def _masked(self, mask: torch.Tensor) -> Iterator[None]:
        blocks = self.dual_blocks()
        for block in blocks:
            block._mask = mask
        try:
            yield
        finally:
            for block in blocks:
                block._mask = None

    def global_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pass 1: the plain UNet; DualNorm layers are not touched."""
        return super().forward(x)

    def local_forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pass 2 conditioned on ``mask`` (N, K, *S'), used as given (detach it yourself)."""
        with self._masked(mask):
            return super().forward(x)

    def dual_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z1, z2)``: pass 1, then pass 2 on the detached ``softmax(z1)``."""
        z1 = self.global_forward(x)
        return z1, self.local_forward(x, torch.softmax(z1.detach(), dim=1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            return self.local_forward(x, mask)
        if self.training or self.stage == "baseline":
            return self.global_forward(x)
        return self.dual_forward(x)[1]

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn, step: StepFn) -> torch.Tensor:
        """One iteration of the official recipe; returns the detached loss of the final pass.

        ``dual``: pass 1 -> loss(z1) -> ``step(loss1)``; then pass 2 with the mask
        taken from z1 *before* that step -> loss(z2) -> ``step(loss2, clip_value)``.
        ``baseline``: pass 1 -> ``step(loss1, clip_value)`` (the official baseline
        path clips too).
        """
        z1 = self.global_forward(images)
        loss1 = loss_fn(z1, labels)
        if self.stage == "baseline":
            step(loss1, clip_value=self.clip_value)
            return loss1.detach()
        mask = torch.softmax(z1.detach(), dim=1)
        step(loss1, clip_value=None)
        z2 = self.local_forward(images, mask)
        loss2 = loss_fn(z2, labels)
        step(loss2, clip_value=self.clip_value)
        return loss2.detach()


@dataclass(frozen=True)
class Stage1Load:
    """What :func:`load_stage1_weights` took and left (sorted key tuples)."""

    loaded: tuple[str, ...]
    not_in_model: tuple[str, ...]
    shape_mismatch: tuple[str, ...]
    kept: tuple[str, ...]  # model keys with no stage-1 tensor (e.g. the DualNorm layers)


def load_stage1_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Stage1Load:
    """Load stage-1 (plain UNet) weights non-strictly: only keys present with the same shape."""
    own = model.state_dict()
    loadable = {k: v for k, v in state_dict.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    model.load_state_dict(loadable, strict=False)
    return Stage1Load(
        loaded=tuple(sorted(loadable)),
        not_in_model=tuple(sorted(k for k in state_dict if k not in own)),
        shape_mismatch=tuple(sorted(k for k in state_dict if k in own and k not in loadable)),
        kept=tuple(sorted(k for k in own if k not in loadable)),
    )


@register_model("dualnorm_unet", DualNormUNetConfig, "DualNorm-UNet: residual U-Net with mask-conditioned DualNorm blocks")
def build_dualnorm_unet(cfg: DualNormUNetConfig) -> nn.Module:
    return DualNormUNet(cfg)
