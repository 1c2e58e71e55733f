"""Batch-Instance Normalization (Nam & Kim, NeurIPS 2018; methods.md §2.2).

``y = gamma * (rho * BN(x) + (1 - rho) * IN(x)) + beta`` with a per-channel
``rho`` that the authors clamp to [0, 1] after every optimizer step and train
with 10x the learning rate and no weight decay. The BN part keeps running
statistics (used in eval); the IN part always uses the sample's own statistics.

The layer owns its BN buffers directly instead of subclassing ``_BatchNorm``:
code that rewrites every ``_BatchNorm`` (e.g. ``convert_sync_batchnorm``) would
otherwise silently replace it by a plain BN and drop ``rho``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import TensorRole, register_norm, register_norm_type


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


def bin_layers(model: nn.Module) -> list[BatchInstanceNorm]:
    """Every BIN layer in ``model``."""
    return [m for m in model.modules() if isinstance(m, BatchInstanceNorm)]


@torch.no_grad()
def clamp_bin_rho_(model: nn.Module) -> None:
    """Clamp every BIN ``rho`` into [0, 1]; call after each ``optimizer.step()``."""
    for layer in bin_layers(model):
        layer.rho.clamp_(0.0, 1.0)


def bin_param_groups(
    model: nn.Module, lr: float, weight_decay: float, rho_lr_multiplier: float = 10.0
) -> list[dict[str, object]]:
    """Optimizer groups: every parameter once; BIN's ``rho`` at ``lr * multiplier`` without weight decay."""
    rho_ids = {id(layer.rho) for layer in bin_layers(model)}
    rhos = [p for p in model.parameters() if id(p) in rho_ids]
    others = [p for p in model.parameters() if id(p) not in rho_ids]
    groups: list[dict[str, object]] = [{"params": others, "lr": lr, "weight_decay": weight_decay}]
    if rhos:
        groups.append({"params": rhos, "lr": lr * rho_lr_multiplier, "weight_decay": 0.0})
    return groups


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
)
register_norm(
    "bin",
    batch_instance_norm,
    "batch-instance normalization (clamped BN/IN mix; BN running stats at eval)",
    batch_independent=False,
)
