"""MONAI's segmentation networks behind one adapter, with the library's norms in their norm slots.

``norm`` takes either

* a registered norm name (``"batch"``, ``"group"``, ``"iln"``, ...; options in
  ``norm-options``): MONAI builds the network with a BatchNorm placeholder in every
  norm slot and the adapter replaces each placeholder (and each norm the network
  hard-codes, as AttentionUnet does) by the registry norm of the same width, so every
  norm of ``shared_models.norms`` works in every MONAI network; or
* MONAI's own syntax, a list ``[name, {args}]`` such as ``["instance", {"affine":
  true}]``, handed to MONAI's factory unchanged (networks with a norm argument only).

Either way the partition classifies the norm modules by type (MONAI builds torch's
BatchNorm/InstanceNorm/GroupNorm/LayerNorm, all registered), never by their
``adn.N`` key names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monai.networks.nets import AttentionUnet, BasicUNet, DynUNet, SegResNet, UNet
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..norms import build_norm, norm_names
from .registry import register_model

__all__ = ["MonaiNetConfig", "register_monai_net", "replace_norms"]

PLACEHOLDER = "batch"  # the norm MONAI builds in each slot before the registry norm replaces it


@dataclass(frozen=True)
class MonaiNetConfig:
    """What every adapted MONAI network is configured by (YAML keys in kebab-case)."""

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 2
    norm: Any = "batch"
    norm_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial-dims must be 2 or 3, got {self.spatial_dims}")
        if self.in_channels <= 0 or self.out_channels < 2:
            raise ValueError("in-channels must be > 0 and out-channels >= 2 (background + classes)")
        if isinstance(self.norm, str):
            if self.norm not in norm_names():
                raise ValueError(f"norm: unknown norm {self.norm!r} (registered: {', '.join(norm_names())})")
        elif not (isinstance(self.norm, (list, tuple)) and len(self.norm) == 2 and isinstance(self.norm[0], str)):
            raise ValueError(f"norm: expected a registered norm name or MONAI's [name, {{args}}], got {self.norm!r}")
        elif self.norm_options:
            raise ValueError("norm-options apply to a registered norm name, not to MONAI's [name, {args}]")


def _slot_width(module: nn.Module) -> int | None:
    """Channels of a norm slot MONAI filled (batch/instance/group norm), else None."""
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return None


def replace_norms(net: nn.Module, norm: str, spatial_dims: int, options: dict[str, Any]) -> nn.Module:
    """Put the registry norm ``norm`` in every norm slot of ``net`` (in place), keeping each slot's width.

    The slots are the placeholders built from the norm argument and the ones a network
    hard-codes (AttentionUnet's BatchNorms and its merge convolutions' InstanceNorm).
    """
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            width = _slot_width(child)
            if width is not None:
                setattr(parent, child_name, build_norm(norm, width, spatial_dims, **options))
    return net


def register_monai_net(
    name: str,
    config_cls: type[MonaiNetConfig],
    description: str,
    net_cls: Callable[..., nn.Module],
    arguments: Callable[[Any], dict[str, Any]],
    norm_arg: str | None,
) -> None:
    """Register MONAI's ``net_cls(**arguments(cfg), <norm_arg>=...)`` under ``name``.

    ``norm_arg`` is the network's norm keyword (``None`` when it hard-codes BatchNorm,
    which then only takes registered norm names).
    """

    def build(cfg: MonaiNetConfig) -> nn.Module:
        kwargs = arguments(cfg)
        if isinstance(cfg.norm, str):
            if norm_arg is not None:
                kwargs[norm_arg] = PLACEHOLDER
            return replace_norms(net_cls(**kwargs), cfg.norm, cfg.spatial_dims, cfg.norm_options)
        if norm_arg is None:
            raise ValueError(f"{name}: norm must be a registered norm name (the network hard-codes its norm slots)")
        kwargs[norm_arg] = tuple(cfg.norm)
        return net_cls(**kwargs)

    register_model(name, config_cls, description)(build)


def _strides(levels: int) -> tuple[int, ...]:
    return (2,) * (levels - 1)


@dataclass(frozen=True)
class MonaiUNetConfig(MonaiNetConfig):
    """``monai.networks.nets.UNet`` (strides of 2 between levels)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 2


@dataclass(frozen=True)
class MonaiBasicUNetConfig(MonaiNetConfig):
    """``monai.networks.nets.BasicUNet`` (six feature widths)."""

    norm: Any = ("instance", {"affine": True})
    features: tuple[int, ...] = (16, 16, 32, 64, 128, 16)


@dataclass(frozen=True)
class MonaiDynUNetConfig(MonaiNetConfig):
    """``monai.networks.nets.DynUNet`` (nnU-Net's layout): one width per level, 3^d kernels, strides 1, 2, 2, ..."""

    norm: Any = "instance"
    filters: tuple[int, ...] = (16, 32, 64, 128)
    res_block: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.filters) < 3:
            raise ValueError(f"filters: DynUNet needs >= 3 levels, got {list(self.filters)}")


@dataclass(frozen=True)
class MonaiSegResNetConfig(MonaiNetConfig):
    """``monai.networks.nets.SegResNet`` (residual encoder, light decoder)."""

    norm: Any = "group"
    init_filters: int = 8
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)


@dataclass(frozen=True)
class MonaiAttentionUnetConfig(MonaiNetConfig):
    """``monai.networks.nets.AttentionUnet`` (attention-gated skips; MONAI hard-codes BatchNorm there)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.norm, str):
            raise ValueError("norm: AttentionUnet hard-codes its norm slots; give a registered norm name")


def _common(cfg: MonaiNetConfig) -> dict[str, Any]:
    return {"spatial_dims": cfg.spatial_dims, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels}


def _unet(cfg: MonaiUNetConfig) -> dict[str, Any]:
    return {**_common(cfg), "channels": cfg.channels, "strides": _strides(len(cfg.channels)), "num_res_units": cfg.num_res_units}


def _dynunet(cfg: MonaiDynUNetConfig) -> dict[str, Any]:
    levels = len(cfg.filters)
    strides = (1, *_strides(levels))
    return {
        **_common(cfg),
        "kernel_size": (3,) * levels,
        "strides": strides,
        "upsample_kernel_size": strides[1:],
        "filters": cfg.filters,
        "res_block": cfg.res_block,
    }


def _segresnet(cfg: MonaiSegResNetConfig) -> dict[str, Any]:
    return {**_common(cfg), "init_filters": cfg.init_filters, "blocks_down": cfg.blocks_down, "blocks_up": cfg.blocks_up}


def _attention_unet(cfg: MonaiAttentionUnetConfig) -> dict[str, Any]:
    return {**_common(cfg), "channels": cfg.channels, "strides": _strides(len(cfg.channels))}


register_monai_net("monai_unet", MonaiUNetConfig, "MONAI UNet (residual units)", UNet, _unet, "norm")
register_monai_net(
    "monai_basicunet", MonaiBasicUNetConfig, "MONAI BasicUNet", BasicUNet, lambda cfg: {**_common(cfg), "features": cfg.features}, "norm"
)
register_monai_net("monai_dynunet", MonaiDynUNetConfig, "MONAI DynUNet (nnU-Net layout)", DynUNet, _dynunet, "norm_name")
register_monai_net("monai_segresnet", MonaiSegResNetConfig, "MONAI SegResNet", SegResNet, _segresnet, "norm")
register_monai_net(
    "monai_attentionunet", MonaiAttentionUnetConfig, "MONAI AttentionUnet (attention-gated skips)", AttentionUnet, _attention_unet, None
)
