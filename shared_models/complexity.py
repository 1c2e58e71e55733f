"""Parameter and multiply-accumulate (MAC) counts, measured with forward hooks.

Why our own counter: the papers we compare with report "-59% parameters, -76%
FLOPs vs U-Net" and similar; we need the same kind of number for any registered
model without adding a dependency (thop/fvcore/ptflops).

What ``count_macs`` counts, per sample batch of ``input_shape``:

* convolution (any dims): ``out.numel() * (C_in / groups) * prod(kernel)``;
* transposed convolution: ``in.numel() * (C_out / groups) * prod(kernel)``
  (every input element is scattered through the kernel);
* linear: ``out.numel() * in_features``;
* normalization (any *leaf* module whose type is a registered norm type):
  ``in.numel()``, one multiply-add per element for the scale/shift; computing the
  statistics is not counted. Composite norms are counted through their children.

Not counted: activations, pooling, interpolation, softmax, element-wise sums and
products, padding/reshapes, and matmuls done in ``torch.*`` functions outside the
modules above. Biases are not counted separately. The count is taken in eval mode
under ``torch.no_grad()``, so train-only paths (e.g. SelfReg features) cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .norms.registry import norm_type_of

__all__ = ["count_macs", "count_parameters", "macs_by_module"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared tensors counted once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _module_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    if isinstance(module, _ConvTransposeNd):
        per_input = (module.out_channels // module.groups) * math.prod(module.kernel_size)
        return inputs[0].numel() * per_input
    if isinstance(module, _ConvNd):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output.numel() * per_output
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if norm_type_of(module) is not None and not any(True for _ in module.children()):
        return inputs[0].numel()
    return 0


def macs_by_module(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs of every counted module for one forward pass of a zero tensor of ``input_shape``.

    ``input_shape`` is the full input shape ``(N, C, *spatial)``. A module called
    several times in one forward pass is summed over its calls.
    """
    counts: dict[str, int] = {}
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            macs = _module_macs(module, inputs, output)
            if macs:
                counts[name] = counts.get(name, 0) + macs

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(hook_for(name)))
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counts


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Total MACs of one forward pass on an input of shape ``(N, C, *spatial)`` (see module doc)."""
    return sum(macs_by_module(model, input_shape).values())
