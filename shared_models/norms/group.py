"""Group normalization (statistics over channel groups x space, per sample)."""

from __future__ import annotations

import math

from torch import nn

from .registry import AFFINE_ROLES, register_norm, register_norm_type


def default_num_groups(num_features: int, preferred: int = 8) -> int:
    """Largest divisor of ``num_features`` not above ``preferred`` (gcd fallback)."""
    return math.gcd(num_features, preferred)


def group_norm(num_features: int, spatial_dims: int, num_groups: int | None = None, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """``nn.GroupNorm``; ``num_groups`` defaults to gcd(C, 8) so any width works."""
    groups = default_num_groups(num_features) if num_groups is None else num_groups
    if num_features % groups:
        raise ValueError(f"num_groups={groups} does not divide num_features={num_features}")
    return nn.GroupNorm(groups, num_features, eps=eps, affine=affine)


register_norm_type(nn.GroupNorm, AFFINE_ROLES)
register_norm("group", group_norm, "group normalization", batch_independent=True)
