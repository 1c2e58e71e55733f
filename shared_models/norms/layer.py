"""Layer normalization for feature maps: statistics over (C x space) per sample.

Built as ``GroupNorm(1, C)``, which is exactly LN over channels and space with a
per-channel affine (the usual LN for conv nets). ``nn.LayerNorm`` itself is
registered too, for networks (e.g. transformer blocks) that use it directly.
"""

from __future__ import annotations

from torch import nn

from .registry import AFFINE_ROLES, register_norm, register_norm_type


def layer_norm(num_features: int, spatial_dims: int, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """One group spanning every channel: per-sample statistics over C x space."""
    return nn.GroupNorm(1, num_features, eps=eps, affine=affine)


register_norm_type(nn.LayerNorm, AFFINE_ROLES)
register_norm("layer", layer_norm, "layer normalization over channels and space", batch_independent=True)
