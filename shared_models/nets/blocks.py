"""Building blocks shared by the library's convolutional networks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from ..norms import build_norm


@dataclass(frozen=True)
class UShapeConfig:
    """What every U-shaped net of the library is configured by (YAML keys in kebab-case)."""

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = (16, 32, 64, 128)
    norm: str = "batch"
    norm_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_unet_shape(self.spatial_dims, self.channels, self.in_channels, self.out_channels)


def check_unet_shape(spatial_dims: int, channels: tuple[int, ...], in_channels: int, out_channels: int) -> None:
    """Validate the hyper-parameters every U-shaped net of the library shares."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial-dims must be 2 or 3, got {spatial_dims}")
    if len(channels) < 2 or any(c <= 0 for c in channels):
        raise ValueError(f"channels must list >= 2 positive widths, got {list(channels)}")
    if in_channels <= 0 or out_channels < 2:
        raise ValueError("in-channels must be > 0 and out-channels >= 2 (background + classes)")


def conv(spatial_dims: int, in_ch: int, out_ch: int, kernel: int = 3, bias: bool = True) -> nn.Module:
    """Same-padding convolution in 2D or 3D (MONAI's dimension-generic factory)."""
    return Conv[Conv.CONV, spatial_dims](in_ch, out_ch, kernel_size=kernel, padding=kernel // 2, bias=bias)


def max_pool(spatial_dims: int) -> nn.Module:
    """2x downsampling by max pooling."""
    return Pool[Pool.MAX, spatial_dims](kernel_size=2)


def up_conv(spatial_dims: int, in_ch: int, out_ch: int) -> nn.Module:
    """Exact 2x upsampling: transposed conv k3 s2 p1, output_padding 1."""
    return Conv[Conv.CONVTRANS, spatial_dims](in_ch, out_ch, kernel_size=3, stride=2, padding=1, output_padding=1)


def match_size(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pad (or crop) the spatial dims of ``x`` to those of ``like`` (odd sizes)."""
    pads: list[int] = []
    for have, want in zip(reversed(x.shape[2:]), reversed(like.shape[2:])):
        diff = want - have
        pads += [diff // 2, diff - diff // 2]
    return F.pad(x, pads) if any(pads) else x


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(relu(norm1(conv(relu(norm0(x))))))."""

    def __init__(self, spatial_dims: int, channels: int, norm: str, norm_options: dict[str, Any]):
        super().__init__()
        self.norm0 = build_norm(norm, channels, spatial_dims, **norm_options)
        self.conv0 = conv(spatial_dims, channels, channels)
        self.norm1 = build_norm(norm, channels, spatial_dims, **norm_options)
        self.conv1 = conv(spatial_dims, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.relu(self.norm0(x)))
        return x + self.conv1(F.relu(self.norm1(h)))
