"""Batch normalization (running statistics: the tensors FedBN/SiloBN keep local)."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .registry import BATCHNORM_ROLES, register_norm, register_norm_type

_BATCHNORM_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def batch_norm(num_features: int, spatial_dims: int, momentum: float = 0.1, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """``nn.BatchNorm{1,2,3}d``; train mode uses batch statistics, eval the running ones."""
    return _BATCHNORM_BY_DIM[spatial_dims](num_features, eps=eps, momentum=momentum, affine=affine)


register_norm_type(_BatchNorm, BATCHNORM_ROLES)  # also covers SyncBatchNorm and MONAI's use of BN
register_norm("batch", batch_norm, "batch normalization (batch statistics, running stats at eval)", batch_independent=False)
