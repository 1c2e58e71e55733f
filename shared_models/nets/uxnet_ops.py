"""Candidate operators of the UXNet-style search space (methods.md §5.3, [UNVERIFIED]).

The abstract says "block-wise operators" are searched but not which; the list
below is our reconstruction and must be checked against the paper's search space:
3^d conv, dilated 3^d conv (dilation 2), depthwise-separable 3^d conv, and in 3D
the in-plane 3x3x1 conv and pseudo-3D (3x3x1 then 1x1x3), plus identity. Every
operator is conv -> registry norm -> ReLU (identity excepted), keeps the width,
and keeps the spatial size. The last axis is the through-plane axis in 3D.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monai.networks.layers.factories import Conv
from torch import nn

from ..norms import build_norm

__all__ = ["DEFAULT_OPS", "OPS", "build_op"]


def _conv_norm_act(
    dims: int,
    channels: int,
    kernel: tuple[int, ...],
    norm: str,
    norm_options: dict[str, Any],
    dilation: int = 1,
    groups: int = 1,
) -> list[nn.Module]:
    padding = tuple(dilation * (k // 2) for k in kernel)
    layer = Conv[Conv.CONV, dims](channels, channels, kernel, padding=padding, dilation=dilation, groups=groups, bias=False)
    return [layer, build_norm(norm, channels, dims, **norm_options), nn.ReLU()]


def _conv3(dims: int, c: int, norm: str, opts: dict[str, Any]) -> nn.Module:
    return nn.Sequential(*_conv_norm_act(dims, c, (3,) * dims, norm, opts))


def _dil_conv3(dims: int, c: int, norm: str, opts: dict[str, Any]) -> nn.Module:
    return nn.Sequential(*_conv_norm_act(dims, c, (3,) * dims, norm, opts, dilation=2))


def _sep_conv3(dims: int, c: int, norm: str, opts: dict[str, Any]) -> nn.Module:
    depthwise = _conv_norm_act(dims, c, (3,) * dims, norm, opts, groups=c)
    return nn.Sequential(*depthwise, *_conv_norm_act(dims, c, (1,) * dims, norm, opts))


def _inplane_conv3(dims: int, c: int, norm: str, opts: dict[str, Any]) -> nn.Module:
    _require_3d("inplane_conv3", dims)
    return nn.Sequential(*_conv_norm_act(dims, c, (3, 3, 1), norm, opts))


def _p3d(dims: int, c: int, norm: str, opts: dict[str, Any]) -> nn.Module:
    _require_3d("p3d", dims)
    return nn.Sequential(*_conv_norm_act(dims, c, (3, 3, 1), norm, opts), *_conv_norm_act(dims, c, (1, 1, 3), norm, opts))


def _identity(dims: int, c: int, norm: str, opts: dict[str, Any]) -> nn.Module:
    return nn.Identity()


def _require_3d(name: str, dims: int) -> None:
    if dims != 3:
        raise ValueError(f"operator {name!r} is 3D only (spatial_dims={dims})")


OPS: dict[str, Callable[[int, int, str, dict[str, Any]], nn.Module]] = {
    "conv3": _conv3,
    "dil_conv3": _dil_conv3,
    "sep_conv3": _sep_conv3,
    "inplane_conv3": _inplane_conv3,
    "p3d": _p3d,
    "identity": _identity,
}

DEFAULT_OPS: dict[int, tuple[str, ...]] = {
    2: ("conv3", "dil_conv3", "sep_conv3", "identity"),
    3: ("conv3", "inplane_conv3", "p3d", "dil_conv3", "identity"),
}


def build_op(name: str, spatial_dims: int, channels: int, norm: str, norm_options: dict[str, Any]) -> nn.Module:
    """Build candidate operator ``name`` (width- and size-preserving)."""
    if name not in OPS:
        raise ValueError(f"unknown UXNet operator {name!r} (known: {', '.join(OPS)})")
    return OPS[name](spatial_dims, channels, norm, norm_options)
