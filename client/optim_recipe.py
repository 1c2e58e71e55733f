"""The site's local optimizer: a registry of name -> factory over the norm-aware parameter groups.

Every factory receives :func:`shared_models.norms.optim.param_groups` (a norm's
own learning-rate multiplier and weight decay per group), so a new optimizer
needs one entry here and nothing in the training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shared_models.norms.optim import param_groups
from shared_models.protocol import TrainSettings

OptimizerFactory = Callable[[list[dict[str, Any]], TrainSettings], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adam": lambda groups, s: torch.optim.Adam(groups, lr=s.lr),
    # decoupled weight decay: each group's ``weight_decay`` (settings.weight_decay, or a norm rule's)
    "adamw": lambda groups, s: torch.optim.AdamW(groups, lr=s.lr),
    # nnU-Net's recipe: SGD with Nesterov momentum 0.99
    "sgd": lambda groups, s: torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, nesterov=True),
}


def build_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """The optimizer ``settings.optimizer`` names, over ``model``'s norm-aware parameter groups."""
    factory = OPTIMIZERS.get(settings.optimizer)
    if factory is None:
        raise ValueError(f"unknown optimizer {settings.optimizer!r} (known: {', '.join(OPTIMIZERS)})")
    return factory(param_groups(model, settings.lr, settings.weight_decay), settings)


def load_moments(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a stored optimizer's per-parameter state (moments, step counts) into ``optimizer``.

    Only the state carries over: the hyperparameters (learning rate, betas,
    momentum, weight decay) stay those of this round's settings. Raises
    ``ValueError`` when the stored groups do not match this optimizer's.
    """
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        for index, entry in state["state"].items():
            for name, value in entry.items():
                if torch.is_tensor(value) and value.dim() and value.shape != params[index].shape:
                    raise ValueError(f"state {name!r} of parameter {index} has shape {tuple(value.shape)}, "
                                     f"the parameter {tuple(params[index].shape)}")
        optimizer.load_state_dict(state)
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"not an optimizer state of this model ({exc.__class__.__name__}: {exc})") from exc
    for group, values in zip(optimizer.param_groups, hyper):
        group.update(values)
