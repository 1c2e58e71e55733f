"""DualNorm: mask-conditioned normalization of DualNorm-UNet (Xiao et al. 2021; methods.md §1.3).

``y = BN_noaffine(x) * (1 + gamma_map) + beta_map``, where the spatial maps come
from a soft semantic mask (class probabilities) through a SPADE-like head: a
shared 3x3 conv (K -> C // reduction) + ReLU, then two 3x3 convs to C channels.
The normalization keeps global (batch) statistics; the class regions get their
own scale and shift. The mask is resized to the feature map: (bi/tri)linear with
aligned corners in ``soft`` mode, nearest in ``hard`` mode (no binarization, as
in the official code). 3D (and 1D) use the same recipe with Conv3d/Conv1d:
our extension, the paper is 2D.

Not a buildable entry of ``NORMS`` (it needs a mask); its type is registered so
:func:`shared_models.partition.partition` covers it: the nested affine-free
BatchNorm classifies its own running statistics (STATISTIC), the convs are
MODULATION.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .registry import TensorRole, register_norm_type

MaskMode = Literal["soft", "hard"]

_BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_SOFT_RESIZE = {1: "linear", 2: "bilinear", 3: "trilinear"}


class DualNormLayer(nn.Module):
    """Affine-free BN modulated by per-pixel gamma/beta maps predicted from a class mask."""

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        spatial_dims: int = 2,
        reduction: int = 2,
        kernel: int = 3,
        mask_mode: MaskMode = "soft",
        eps: float = 1e-5,
        momentum: float = 0.1,
        zero_init_heads: bool = False,
    ):
        super().__init__()
        if mask_mode not in ("soft", "hard"):
            raise ValueError(f"mask_mode must be 'soft' or 'hard', got {mask_mode!r}")
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        hidden = max(1, num_features // reduction)
        conv = _CONV[spatial_dims]
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.mask_mode = mask_mode
        self.bn = _BATCHNORM[spatial_dims](num_features, eps=eps, momentum=momentum, affine=False)
        self.shared = nn.Sequential(conv(num_classes, hidden, kernel, padding=kernel // 2), nn.ReLU())
        self.gamma_head = conv(hidden, num_features, kernel, padding=kernel // 2)
        self.beta_head = conv(hidden, num_features, kernel, padding=kernel // 2)
        if zero_init_heads:  # [UNVERIFIED] option: start as the plain affine-free BN
            for head in (self.gamma_head, self.beta_head):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def resize_mask(self, mask: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The mask at the feature map's spatial ``size`` (soft: aligned-corner interpolation; hard: nearest)."""
        if mask.dim() != self.spatial_dims + 2:
            raise ValueError(f"mask must be (N, K, *{self.spatial_dims} spatial), got {tuple(mask.shape)}")
        if tuple(mask.shape[2:]) == tuple(size):
            return mask
        if self.mask_mode == "hard":
            return F.interpolate(mask, size=tuple(size), mode="nearest")
        return F.interpolate(mask, size=tuple(size), mode=_SOFT_RESIZE[self.spatial_dims], align_corners=True)

    def modulation(self, mask: torch.Tensor, size: torch.Size | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gamma_map, beta_map)``, each (N, C, *size), predicted from ``mask``."""
        hidden = self.shared(self.resize_mask(mask, size).to(self.gamma_head.weight.dtype))
        return self.gamma_head(hidden), self.beta_head(hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape[0] != x.shape[0]:
            raise ValueError(f"mask batch {mask.shape[0]} != feature batch {x.shape[0]}")
        gamma, beta = self.modulation(mask, x.shape[2:])
        return self.bn(x) * (1 + gamma) + beta


register_norm_type(
    DualNormLayer,
    {
        # "bn.*" is classified by the nested BatchNorm itself (innermost owner first);
        # the pattern stays here so the table documents every tensor.
        "bn.*": TensorRole.STATISTIC,
        "shared.*": TensorRole.MODULATION,
        "gamma_head.*": TensorRole.MODULATION,
        "beta_head.*": TensorRole.MODULATION,
    },
)
