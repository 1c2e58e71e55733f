"""MONAI's stock U-Nets, registered so that partitioning and FL work on them unchanged.

Their norm layers come from MONAI's own factory (``norm`` is passed through in
MONAI's syntax, e.g. ``"batch"`` or ``["instance", {"affine": true}]``); the
partition still classifies them by module type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monai.networks.nets import BasicUNet, UNet
from torch import nn

from .registry import register_model


def _monai_norm(norm: Any) -> Any:
    return tuple(norm) if isinstance(norm, list) else norm


@dataclass(frozen=True)
class MonaiUNetConfig:
    """Arguments of ``monai.networks.nets.UNet`` (strides of 2 between levels)."""

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 2
    norm: Any = "batch"


@register_model("monai_unet", MonaiUNetConfig, "MONAI UNet (residual units)")
def build_monai_unet(cfg: MonaiUNetConfig) -> nn.Module:
    return UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=cfg.channels,
        strides=(2,) * (len(cfg.channels) - 1),
        num_res_units=cfg.num_res_units,
        norm=_monai_norm(cfg.norm),
    )


@dataclass(frozen=True)
class MonaiBasicUNetConfig:
    """Arguments of ``monai.networks.nets.BasicUNet`` (six feature widths)."""

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 2
    features: tuple[int, ...] = (16, 16, 32, 64, 128, 16)
    norm: Any = ("instance", {"affine": True})


@register_model("monai_basicunet", MonaiBasicUNetConfig, "MONAI BasicUNet")
def build_monai_basicunet(cfg: MonaiBasicUNetConfig) -> nn.Module:
    return BasicUNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        features=cfg.features,
        norm=_monai_norm(cfg.norm),
    )
