"""UXNet's architecture search: the DARTS-style step, and the discrete network it ends in.

``search_step`` alternates weight and architecture updates on the supernet;
``derive_architecture`` reads the arg-max operators and the top-k inputs of
every decoder node, ``discretize`` builds the fixed network they describe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .uxnet import SearchBlock, UXNet, arch_parameters, search_modules, set_grads, weight_parameters


def search_step(
    model: nn.Module,
    train_batch: tuple[torch.Tensor, torch.Tensor],
    val_batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    w_opt: torch.optim.Optimizer,
    a_opt: torch.optim.Optimizer,
) -> dict[str, float]:
    """One first-order DARTS step: alpha/beta on ``val_batch``, then weights on ``train_batch``.

    Each half computes gradients for its own parameter group only, so neither
    optimizer ever sees the other's gradients. Returns both losses.
    """
    a_params, w_params = arch_parameters(model), weight_parameters(model)
    a_opt.zero_grad(set_to_none=True)
    val_loss = loss_fn(model(val_batch[0]), val_batch[1])
    set_grads(val_loss, a_params)
    a_opt.step()
    w_opt.zero_grad(set_to_none=True)
    train_loss = loss_fn(model(train_batch[0]), train_batch[1])
    set_grads(train_loss, w_params)
    w_opt.step()
    w_opt.zero_grad(set_to_none=True)
    a_opt.zero_grad(set_to_none=True)
    return {"val_loss": float(val_loss.detach()), "train_loss": float(train_loss.detach())}


# ----------------------------------------------------------------- discretisation
def _ranked(weights: torch.Tensor) -> list[int]:
    """Indices by decreasing weight; ties keep declaration order."""
    values = weights.tolist()
    return sorted(range(len(values)), key=lambda i: -values[i])


def derive_architecture(model: UXNet, top_k: int | None = None) -> dict[str, Any]:
    """The ``fixed_arch`` dict: arg-max op per block, top-k inputs per node with renormalised weights."""
    k = model.config.top_k if top_k is None else top_k
    root = {id(m): n for n, m in model.named_modules()}
    ops: dict[str, str] = {}
    inputs: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for _, m in search_modules(model):
            name = root[id(m)]
            if isinstance(m, SearchBlock):
                names = list(m.ops)
                ops[name] = names[_ranked(m.op_weights())[0]]
            else:
                sources, weights = list(m.inputs), m.input_weights()
                keep = _ranked(weights)[:k]
                if model.config.keep_decoder_chain and len(sources) > 1 and 1 not in keep:
                    # The next-coarser feature (second in candidate_sources) replaces the
                    # weakest kept input, so no decoder node is left dead.
                    keep = sorted(keep[: k - 1] + [1], key=lambda i: -float(weights[i]))
                total = float(sum(weights[i] for i in keep))
                inputs[name] = {sources[i]: float(weights[i]) / total for i in keep}
    return {"ops": ops, "inputs": inputs}


def discretize(model: UXNet, top_k: int | None = None) -> UXNet:
    """Fixed network of the chosen ops/inputs, carrying the supernet's weights for them."""
    arch = derive_architecture(model, top_k)
    fixed = UXNet(replace(model.config, fixed_arch=arch))
    state = model.state_dict()
    fixed.load_state_dict({k: state[k] for k in fixed.state_dict()}, strict=True)
    return fixed.to(next(model.parameters()).device).train(model.training)


def architecture_summary(model: UXNet) -> dict[str, Any]:
    """JSON-able report: chosen op and op weights per block, top inputs and weights per node."""
    arch = derive_architecture(model)
    root = {id(m): n for n, m in model.named_modules()}
    blocks: dict[str, Any] = {}
    nodes: dict[str, Any] = {}
    with torch.no_grad():
        for _, m in search_modules(model):
            name = root[id(m)]
            if isinstance(m, SearchBlock):
                weights = dict(zip(m.ops, m.op_weights().tolist()))
                blocks[name] = {"chosen": arch["ops"][name], "weights": weights}
            else:
                weights = dict(zip(m.inputs, m.input_weights().tolist()))
                nodes[name] = {"level": m.level, "top": list(arch["inputs"][name]), "weights": weights}  # top: best first
    return {"supernet": model.is_supernet, "blocks": blocks, "nodes": nodes, "arch": arch}
