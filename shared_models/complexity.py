"""Parameter and multiply-accumulate (MAC) counts.

MACs come from PyTorch's own FLOP counter (``torch.utils.flop_counter.FlopCounterMode``),
which counts every convolution, transposed convolution, linear layer, ``matmul``/``bmm``
and scaled-dot-product attention dispatched during one forward pass, whether it runs in
a module or in a ``torch.*`` call (attention built from ``torch.matmul`` is counted).
MACs are its FLOPs / 2. Element-wise work (normalization, activations, pooling,
interpolation, sums) is not counted, as in the papers' "FLOPs" columns. The count is
taken in eval mode under ``torch.no_grad()``, so train-only paths cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_parameters", "macs_by_module"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared tensors counted once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _count(model: nn.Module, input_shape: Sequence[int]) -> FlopCounterMode:
    """One eval-mode, no-grad forward pass of a zero tensor of ``input_shape`` under the FLOP counter."""
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(torch.zeros(tuple(input_shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return counter


def macs_by_module(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs per submodule path (``"3.0"``) for one forward pass; a module's count includes its children's.

    ``input_shape`` is the full input shape ``(N, C, *spatial)``. A module called
    several times in one forward pass is summed over its calls.
    """
    root = type(model).__name__
    counts = {}
    for name, ops in _count(model, input_shape).get_flop_counts().items():
        if name.startswith(root + ".") and (macs := sum(ops.values()) // 2):
            counts[name[len(root) + 1 :]] = macs
    return counts


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Total MACs of one forward pass on an input of shape ``(N, C, *spatial)`` (see module doc)."""
    return _count(model, input_shape).get_total_flops() // 2
