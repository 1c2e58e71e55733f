"""Batch-Instance Normalization (Nam & Kim, NeurIPS 2018; methods.md §2.2).

``y = gamma * (rho * BN(x) + (1 - rho) * IN(x)) + beta`` with a per-channel
``rho`` that the authors clamp to [0, 1] after every optimizer step and train
with 10x the learning rate and no weight decay (declared in the registry below;
the trainer applies it through :mod:`.optim`). The BN part keeps running
statistics (used in eval); the IN part always uses the sample's own statistics.

The layer owns its BN buffers directly instead of subclassing ``_BatchNorm``:
code that rewrites every ``_BatchNorm`` (e.g. ``convert_sync_batchnorm``) would
otherwise silently replace it by a plain BN and drop ``rho``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import OptimRule, TensorRole, register_norm, register_norm_type


class BatchInstanceNorm(nn.Module):
    """Per-channel mix of batch- and instance-normalized maps, then a shared affine."""

    def __init__(
        self,
        num_features: int,
        spatial_dims: int = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        rho_init: float = 1.0,
    ):
        super().__init__()
        self.num_features = num_features
        self.spatial_dims = spatial_dims
        self.eps = eps
        self.momentum = momentum
        self.rho = nn.Parameter(torch.full((num_features,), float(rho_init)))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, *([1] * self.spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"BIN{self.spatial_dims}d expects (N, C, *{self.spatial_dims} spatial), got {tuple(x.shape)}")
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative average, as nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        x_bn = F.batch_norm(
            x, self.running_mean, self.running_var, None, None, self.training, 0.0 if momentum is None else momentum, self.eps
        )
        x_in = F.instance_norm(x, eps=self.eps)
        rho = self._per_channel(self.rho)
        mixed = x_in + rho * (x_bn - x_in)
        return mixed * self._per_channel(self.weight) + self._per_channel(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, spatial_dims={self.spatial_dims}, eps={self.eps}, momentum={self.momentum}"


def batch_instance_norm(
    num_features: int, spatial_dims: int, eps: float = 1e-5, momentum: float | None = 0.1, rho_init: float = 1.0
) -> nn.Module:
    """Registry factory for :class:`BatchInstanceNorm` (rho starts at 1 = pure BN, as the authors)."""
    return BatchInstanceNorm(num_features, spatial_dims, eps=eps, momentum=momentum, rho_init=rho_init)


def _clamp_rho_(layer: BatchInstanceNorm) -> None:
    """BIN's projection after each optimizer step: rho back into [0, 1]."""
    layer.rho.clamp_(0.0, 1.0)


register_norm_type(
    BatchInstanceNorm,
    {
        "rho": TensorRole.MIXING,
        "weight": TensorRole.AFFINE,
        "bias": TensorRole.AFFINE,
        "running_mean": TensorRole.STATISTIC,
        "running_var": TensorRole.STATISTIC,
        "num_batches_tracked": TensorRole.STATISTIC,
    },
    optim={"rho": OptimRule(lr_multiplier=10.0, weight_decay=0.0)},
    project=_clamp_rho_,
)
register_norm(
    "bin",
    batch_instance_norm,
    "batch-instance normalization (clamped BN/IN mix; BN running stats at eval)",
    batch_independent=False,
)
