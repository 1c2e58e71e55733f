"""Instance-Layer Normalization (Zhou et al., MMMI 2019; methods.md §2.2-2.3).

A per-channel sigmoid gate mixes instance- and layer-normalized maps; because a
convex mix of two normalized maps is not itself normalized, a cascaded group
norm (no affine) renormalizes it before the per-channel affine. Nothing depends
on the other samples of the batch, so there are no running statistics and
train/eval behave the same (safe with batch size 1).

[UNVERIFIED] details (only the abstract was available), all options:
``rho_init=0`` (gate 0.5); the cascaded GN uses the largest divisor of C that
is at most 32 and smaller than C (32 groups from C = 64, two channels a group
for C <= 32); IN/LN without their own affine; ``eps=1e-5`` in all three
normalizations. Never one channel a group: GN would then be IN again and
renormalize the mix back to IN, so rho would have no effect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import TensorRole, register_norm, register_norm_type


def iln_num_groups(num_features: int, num_groups: int | None = None, largest: int = 32) -> int:
    """Group count of the cascaded GN: the largest divisor of C that is <= ``largest`` and < C (1 for C = 1).

    An explicit ``num_groups`` is honoured as given if it divides C.
    """
    if num_groups is not None:
        if num_groups < 1 or num_features % num_groups:
            raise ValueError(f"ILN: num_groups={num_groups} does not divide num_features={num_features}")
        return num_groups
    return max((g for g in range(1, min(largest, num_features - 1) + 1) if num_features % g == 0), default=1)


class InstanceLayerNorm(nn.Module):
    """``y = gamma * GN(sigmoid(rho) * IN(x) + (1 - sigmoid(rho)) * LN(x)) + beta``.

    ``rho`` is unconstrained (the sigmoid keeps the gate in (0, 1) and
    differentiable everywhere, unlike BIN's clamp).
    """

    def __init__(
        self,
        num_features: int,
        spatial_dims: int = 2,
        num_groups: int | None = None,
        eps: float = 1e-5,
        rho_init: float = 0.0,
    ):
        super().__init__()
        self.num_features = num_features
        self.spatial_dims = spatial_dims
        self.num_groups = iln_num_groups(num_features, num_groups)
        self.eps = eps
        self.rho = nn.Parameter(torch.full((num_features,), float(rho_init)))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, *([1] * self.spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"ILN{self.spatial_dims}d expects (N, C, *{self.spatial_dims} spatial), got {tuple(x.shape)}")
        spatial = tuple(range(2, x.dim()))
        var_in, mean_in = torch.var_mean(x, dim=spatial, keepdim=True, correction=0)
        var_ln, mean_ln = torch.var_mean(x, dim=(1, *spatial), keepdim=True, correction=0)
        x_in = (x - mean_in) * torch.rsqrt(var_in + self.eps)
        x_ln = (x - mean_ln) * torch.rsqrt(var_ln + self.eps)
        gate = self._per_channel(torch.sigmoid(self.rho))
        mixed = x_ln + gate * (x_in - x_ln)
        y = F.group_norm(mixed, self.num_groups, None, None, self.eps)
        return y * self._per_channel(self.weight) + self._per_channel(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, spatial_dims={self.spatial_dims}, num_groups={self.num_groups}, eps={self.eps}"


def instance_layer_norm(
    num_features: int, spatial_dims: int, num_groups: int | None = None, eps: float = 1e-5, rho_init: float = 0.0
) -> nn.Module:
    """Registry factory for :class:`InstanceLayerNorm`."""
    return InstanceLayerNorm(num_features, spatial_dims, num_groups=num_groups, eps=eps, rho_init=rho_init)


register_norm_type(
    InstanceLayerNorm,
    {"rho": TensorRole.MIXING, "weight": TensorRole.AFFINE, "bias": TensorRole.AFFINE},
)
register_norm(
    "iln",
    instance_layer_norm,
    "instance-layer normalization (sigmoid IN/LN mix + cascaded GN, no running stats)",
    batch_independent=True,
)
