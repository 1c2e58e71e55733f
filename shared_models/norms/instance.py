"""Instance normalization with a learnable per-channel affine."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from .registry import BATCHNORM_ROLES, register_norm, register_norm_type

_INSTANCENORM_BY_DIM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def instance_norm(num_features: int, spatial_dims: int, affine: bool = True, eps: float = 1e-5) -> nn.Module:
    """Per-sample, per-channel statistics; affine on by default so FedBN has something to keep."""
    return _INSTANCENORM_BY_DIM[spatial_dims](num_features, eps=eps, affine=affine)


# Instance norm may track running stats (track_running_stats=True): same roles as BN.
register_norm_type(_InstanceNorm, BATCHNORM_ROLES)
register_norm("instance", instance_norm, "instance normalization with affine", batch_independent=True)
