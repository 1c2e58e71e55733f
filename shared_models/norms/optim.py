"""What a norm layer asks of the local optimizer: parameter groups and post-step projections.

Some methods train their norm tensors differently from the rest of the network
(BIN: rho at 10x the learning rate, without weight decay, clamped into [0, 1]
after every step). Each norm type declares that in the registry; the trainer
asks here, so no norm is a special case in the training loop.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import OptimRule, norm_type_of


def _rules(model: nn.Module) -> dict[int, OptimRule]:
    """id(parameter) -> the rule of the innermost registered norm that declares one for it."""
    rules: dict[int, OptimRule] = {}
    for module in model.modules():  # outer modules first: inner ones overwrite
        norm_type = norm_type_of(module)
        if norm_type is None or not norm_type.optim:
            continue
        for name, param in module.named_parameters():
            rule = norm_type.rule_of(name)
            if rule is not None:
                rules[id(param)] = rule
    return rules


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, object]]:
    """Optimizer groups covering every trainable parameter once, merged by (lr, weight decay).

    The first group holds the parameters without a rule; a model without rules
    gives exactly one group, the same as passing ``model.parameters()``.
    """
    rules = _rules(model)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {(lr, weight_decay): []}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        rule = rules.get(id(param))
        key = (lr, weight_decay) if rule is None else (
            lr * rule.lr_multiplier, weight_decay if rule.weight_decay is None else rule.weight_decay)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": g_lr, "weight_decay": g_wd} for (g_lr, g_wd), params in groups.items() if params]


def has_projections(model: nn.Module) -> bool:
    """Whether any norm layer of ``model`` declares a post-step projection (else the trainer skips the walk)."""
    return any((t := norm_type_of(m)) is not None and t.project is not None for m in model.modules())


@torch.no_grad()
def project_(model: nn.Module) -> None:
    """Apply every norm layer's post-step projection (e.g. clamp BIN's rho into [0, 1])."""
    for module in model.modules():
        norm_type = norm_type_of(module)
        if norm_type is not None and norm_type.project is not None:
            norm_type.project(module)
