"""Residual U-Net (2D/3D) with a pluggable normalization.

The layout follows the DualNorm-UNet backbone (methods.md §1.4): a 1x1 stem and a
pre-activation residual block per level, max-pool + conv on the way down,
norm-ReLU-transposed-conv, concatenation and conv + residual block on the way up,
and a norm-ReLU-1x1 head. Any size works (odd sizes are padded on the way up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..norms import build_norm
from .blocks import UShapeConfig, ResBlock, conv, match_size, max_pool, up_conv
from .registry import register_model


@dataclass(frozen=True)
class UNetConfig(UShapeConfig):
    """Hyper-parameters of :class:`ResidualUNet` (YAML keys in kebab-case)."""


class Down(nn.Module):
    """Max-pool, widen with a 3x3 conv, then a residual block."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int):
        super().__init__()
        self.pool = max_pool(cfg.spatial_dims)
        self.conv = conv(cfg.spatial_dims, in_ch, out_ch)
        self.block = ResBlock(cfg.spatial_dims, out_ch, cfg.norm, cfg.norm_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.conv(self.pool(x)))


class Up(nn.Module):
    """Norm-ReLU-upsample, concatenate the skip, fuse with a conv and a residual block."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int):
        super().__init__()
        self.norm = build_norm(cfg.norm, in_ch, cfg.spatial_dims, **cfg.norm_options)
        self.up = up_conv(cfg.spatial_dims, in_ch, out_ch)
        self.conv = conv(cfg.spatial_dims, 2 * out_ch, out_ch)
        self.block = ResBlock(cfg.spatial_dims, out_ch, cfg.norm, cfg.norm_options)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = match_size(self.up(F.relu(self.norm(x))), skip)
        return self.block(self.conv(torch.cat([skip, up], dim=1)))


class ResidualUNet(nn.Module):
    """U-Net with residual blocks; returns logits of shape (N, out_channels, *S)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        dims, widths = cfg.spatial_dims, cfg.channels
        self.stem = conv(dims, cfg.in_channels, widths[0], kernel=1)
        self.inc = ResBlock(dims, widths[0], cfg.norm, cfg.norm_options)
        self.downs = nn.ModuleList(Down(cfg, widths[i], widths[i + 1]) for i in range(len(widths) - 1))
        self.ups = nn.ModuleList(Up(cfg, widths[i + 1], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head_norm = build_norm(cfg.norm, widths[0], dims, **cfg.norm_options)
        self.head = conv(dims, widths[0], cfg.out_channels, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(self.stem(x))]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up in self.ups:
            h = up(h, skips.pop())
        return self.head(F.relu(self.head_norm(h)))


@register_model("unet", UNetConfig, "residual U-Net (DualNorm-UNet backbone) with any registered norm")
def build_unet(cfg: UNetConfig) -> nn.Module:
    return ResidualUNet(cfg)
