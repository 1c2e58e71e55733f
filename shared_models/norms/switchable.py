"""Switchable Normalization (Luo et al., ICLR 2019; methods.md §6.2-6.4).

Mean and variance are softmax-weighted mixes of IN, LN and BN statistics, with
two learned 3-vectors (``mean_weight``, ``var_weight``, "lambda") per layer. Only
the IN statistics are computed from the data; LN and BN ones are derived from
them, which is exact with the biased IN variance (the library default). The
official code uses the unbiased IN variance: ``unbiased_in_var=True``.

Running statistics exist for the BN branch only. They follow the PyTorch
momentum convention, ``r <- (1 - momentum) * r + momentum * batch_stat`` (the
official ``m = 0.9`` for 2D is ``momentum=0.1`` here), and store the derived
(biased) BN variance, unlike ``nn.BatchNorm`` which stores the unbiased one.
Like the official code they start at 0 (``running_var_init`` changes that).
With ``using_moving_average=False`` training adds per-batch sums (mean and
mean^2 + var) to the buffers as the official code does; the buffers are then
only usable after :func:`recompute_sn_bn_stats` ("batch average").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .registry import TensorRole, register_norm, register_norm_type

BRANCHES = ("in", "ln", "bn")


@dataclass
class _BatchStatSums:
    """Sums of per-batch BN-branch statistics while recomputing them."""

    mean: torch.Tensor | float = 0.0
    var: torch.Tensor | float = 0.0
    second: torch.Tensor | float = 0.0  # mean^2 + var, for the pooled variance
    count: int = 0

    def add(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.mean = self.mean + mean
        self.var = self.var + var
        self.second = self.second + mean * mean + var
        self.count += 1


def pooled_moments(mean_in: torch.Tensor, second_in: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the union of equal-size groups from their IN moments.

    ``second_in`` is E[x^2] per (n, c) (= var_in + mean_in^2). Pooling over dim 1
    gives LN statistics, over dim 0 BN statistics; exact for biased IN variance.
    """
    mean = mean_in.mean(dim, keepdim=True)
    return mean, second_in.mean(dim, keepdim=True) - mean * mean


class SwitchNorm(nn.Module):
    """Switchable Normalization over (N, C, *S) for 1, 2 or 3 spatial dims."""

    def __init__(
        self,
        num_features: int,
        spatial_dims: int = 2,
        eps: float = 1e-5,
        momentum: float = 0.1,
        using_moving_average: bool = True,
        using_bn: bool = True,
        last_gamma: bool = False,
        unbiased_in_var: bool = False,
        running_var_init: float = 0.0,
    ):
        super().__init__()
        self.num_features = num_features
        self.spatial_dims = spatial_dims
        self.eps = eps
        self.momentum = momentum
        self.using_moving_average = using_moving_average
        self.using_bn = using_bn
        self.unbiased_in_var = unbiased_in_var
        branches = 3 if using_bn else 2
        self.weight = nn.Parameter(torch.full((num_features,), 0.0 if last_gamma else 1.0))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.mean_weight = nn.Parameter(torch.ones(branches))
        self.var_weight = nn.Parameter(torch.ones(branches))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.full((num_features,), float(running_var_init)))
        self._collector: _BatchStatSums | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"SwitchNorm{self.spatial_dims}d expects (N, C, *{self.spatial_dims} spatial), got {tuple(x.shape)}")
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        var_in, mean_in = torch.var_mean(flat, dim=-1, keepdim=True, correction=int(self.unbiased_in_var))
        second_in = var_in + mean_in * mean_in
        mean_ln, var_ln = pooled_moments(mean_in, second_in, dim=1)
        means, variances = [mean_in, mean_ln], [var_in, var_ln]
        if self.using_bn:
            mean_bn, var_bn = self._bn_statistics(mean_in, second_in)
            means.append(mean_bn)
            variances.append(var_bn)
        w_mean = torch.softmax(self.mean_weight, dim=0)
        w_var = torch.softmax(self.var_weight, dim=0)
        mean = sum(w * m for w, m in zip(w_mean, means))
        var = sum(w * v for w, v in zip(w_var, variances))
        y = ((flat - mean) * torch.rsqrt(var + self.eps)).view_as(x)
        shape = (1, c, *([1] * self.spatial_dims))
        return y * self.weight.view(shape) + self.bias.view(shape)

    def _bn_statistics(self, mean_in: torch.Tensor, second_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch statistics (training/recompute, and tracked) or the running ones (eval)."""
        if not (self.training or self._collector is not None):
            return self.running_mean.view(1, -1, 1), self.running_var.view(1, -1, 1)
        mean_bn, var_bn = pooled_moments(mean_in, second_in, dim=0)
        self._track(mean_bn.detach().view(-1), var_bn.detach().view(-1))
        return mean_bn, var_bn

    @torch.no_grad()
    def _track(self, mean_bn: torch.Tensor, var_bn: torch.Tensor) -> None:
        if self._collector is not None:
            self._collector.add(mean_bn, var_bn)
        elif self.using_moving_average:
            self.running_mean.lerp_(mean_bn, self.momentum)
            self.running_var.lerp_(var_bn, self.momentum)
        else:
            self.running_mean.add_(mean_bn)
            self.running_var.add_(mean_bn * mean_bn + var_bn)

    def branch_weights(self) -> dict[str, list[float]]:
        """Softmaxed lambda as ``{"mean": [w_in, w_ln, w_bn], "var": [...]}`` (w_bn = 0 without BN)."""
        out = {}
        for key, param in (("mean", self.mean_weight), ("var", self.var_weight)):
            weights = torch.softmax(param.detach().float(), dim=0).tolist()
            out[key] = weights + [0.0] * (len(BRANCHES) - len(weights))
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, spatial_dims={self.spatial_dims}, eps={self.eps}, momentum={self.momentum}, "
            f"using_bn={self.using_bn}, using_moving_average={self.using_moving_average}, "
            f"unbiased_in_var={self.unbiased_in_var}"
        )


def switchable_weights(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """Learned IN/LN/BN mix of every SN layer, keyed by module name (for reports)."""
    return {name: m.branch_weights() for name, m in model.named_modules() if isinstance(m, SwitchNorm)}


def _images_of(batch: object) -> torch.Tensor:
    """The input tensor of a batch: a tensor, ``(images, ...)`` or ``{"image": ...}``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    raise TypeError(f"cannot find the images in a batch of type {type(batch).__name__}")


@torch.no_grad()
def recompute_sn_bn_stats(
    model: nn.Module,
    batches: Iterable[object],
    num_batches: int,
    mode: Literal["mean", "pooled"] = "mean",
) -> int:
    """Replace every SN layer's BN buffers by a "batch average" over ``num_batches`` batches.

    The model runs in eval mode (dropout off, other BN layers untouched) except
    that SN layers normalize with batch statistics, as in training. ``mode="mean"``
    stores the arithmetic mean of the per-batch mean and variance (methods.md
    §6.3/§6.6.7); ``"pooled"`` stores the variance of all batches pooled
    (mean of mean^2 + var minus the squared mean), which is what normalizing the
    official ``using_moving_average=False`` sums gives. Returns the batches used.
    """
    if mode not in ("mean", "pooled"):
        raise ValueError(f"mode must be 'mean' or 'pooled', got {mode!r}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    layers = [m for m in model.modules() if isinstance(m, SwitchNorm) and m.using_bn]
    if not layers:
        return 0
    modes = {m: m.training for m in model.modules()}
    device = layers[0].running_mean.device
    model.eval()
    for layer in layers:
        layer._collector = _BatchStatSums()
    try:
        used = 0
        for batch in batches:
            if used >= num_batches:
                break
            model(_images_of(batch).to(device))
            used += 1
        if used == 0:
            raise ValueError("recompute_sn_bn_stats: no batches")
        for layer in layers:
            sums = layer._collector
            if sums is None or sums.count == 0:
                continue  # layer not on the forward path: keep its buffers
            mean = sums.mean / sums.count  # count > used if the model calls a layer twice per batch
            var = sums.var / sums.count if mode == "mean" else sums.second / sums.count - mean * mean
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    finally:
        for layer in layers:
            layer._collector = None
        for module, training in modes.items():
            module.training = training
    return used


register_norm_type(
    SwitchNorm,
    {
        "running_mean": TensorRole.STATISTIC,
        "running_var": TensorRole.STATISTIC,
        "weight": TensorRole.AFFINE,
        "bias": TensorRole.AFFINE,
        "mean_weight": TensorRole.MIXING,
        "var_weight": TensorRole.MIXING,
    },
)
register_norm(
    "switchable",
    SwitchNorm,  # its signature is the registry factory's: (num_features, spatial_dims, **options)
    "switchable normalization (learned softmax mix of IN/LN/BN statistics)",
    batch_independent=False,
)
