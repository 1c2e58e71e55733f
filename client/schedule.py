"""The site's learning-rate schedule over the whole federation's local steps.

A site trains ``steps_per_round`` optimizer steps in each of ``num_rounds``
rounds; the schedule runs over all of them (T = num_rounds x steps_per_round),
so the learning rate keeps falling across rounds instead of restarting each
round. ``poly`` is nnU-Net's ``(1 - t/T)^0.9``; ``cosine`` is ``0.5 (1 + cos(pi t/T))``.
The factor is a pure function of the global step, so a resumed round sets the
same learning rates as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared_models.protocol import RoundConfig, TrainSettings

# progress p in [0, 1] of the decay phase -> multiplier of the base learning rate
SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda p: 1.0,
    "poly": lambda p: (1.0 - p) ** 0.9,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
}


def lr_factor(schedule: str, step: int, total: int, warmup_fraction: float = 0.0) -> float:
    """Multiplier of the base learning rate at global step ``step`` (0-based) of ``total``.

    The first ``W = round(warmup_fraction * total)`` steps rise linearly to 1
    (the first at ``1/(W+1)``, never a wasted step at 0); the schedule then decays
    over the remaining ``total - W`` steps, reaching 0 at ``step == total``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    if total < 1:
        raise ValueError(f"a schedule needs at least one step, got total={total}")
    step = min(max(step, 0), total)
    warmup = min(round(warmup_fraction * total), total - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return SCHEDULES[schedule]((step - warmup) / (total - warmup))


def round_settings(cfg: RoundConfig) -> TrainSettings:
    """The round's training settings: a new shuffle and augmentation draw every round.

    Every model a site trains in a round as "its own" (the federated one, and Ditto's
    personal one) draws from this stream, so a personal model with a vanishing pull
    is the ``local`` method's model exactly, and the two arms compare on the same draws.
    """
    return dataclasses.replace(cfg.train, seed=cfg.train.seed * 100_003 + cfg.server_round)


@dataclass(frozen=True)
class RoundPosition:
    """Where this round's local steps lie in the federation (a lone call: round 1 of 1).

    ``tail_epochs`` of site fine-tuning may follow the last round (``-ft`` methods): the
    schedule then spans them too, so the rounds do not decay to 0 and the fine-tuning
    continues the same schedule (:class:`TailPosition`) instead of restarting it.
    """

    server_round: int = 1
    num_rounds: int = 1
    tail_epochs: int = 0
    round_epochs: int = 1

    def span(self, steps_per_round: int) -> tuple[int, int]:
        """(global step of this round's first step, total steps of the federation and its tail)."""
        rnd = max(self.server_round, 1)
        rounds = max(self.num_rounds, rnd)  # an unknown or exceeded length ends the schedule with this round
        tail = round(self.tail_epochs * steps_per_round / max(self.round_epochs, 1))
        return (rnd - 1) * steps_per_round, rounds * steps_per_round + tail


def round_position(cfg: RoundConfig) -> RoundPosition:
    """Where ``cfg``'s round lies in the federation's schedule (any fine-tuning tail included)."""
    return RoundPosition(cfg.server_round, cfg.num_rounds, cfg.finetune_epochs, cfg.train.epochs)


@dataclass(frozen=True)
class TailPosition:
    """The site's fine-tuning after ``num_rounds`` rounds of ``round_epochs`` epochs: its steps end the schedule."""

    num_rounds: int
    round_epochs: int
    tail_epochs: int

    def span(self, tail_steps: int) -> tuple[int, int]:
        """(global step of the fine-tuning's first step, total steps); ``tail_steps`` covers ``tail_epochs`` epochs."""
        steps_per_epoch = tail_steps / max(self.tail_epochs, 1)
        first = round(self.num_rounds * self.round_epochs * steps_per_epoch)
        return first, first + tail_steps


class LrSchedule:
    """Sets each optimizer group's learning rate to its base rate times :func:`lr_factor`.

    The base rates are the groups' own (a norm rule's 10x stays 10x), read once at
    construction, before any stored optimizer state is loaded.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: str, warmup_fraction: float, first_step: int, total: int):
        self.optimizer, self.schedule, self.warmup = optimizer, schedule, warmup_fraction
        self.first_step, self.total = first_step, total
        self.base = [float(g["lr"]) for g in optimizer.param_groups]

    def set(self, local_step: int) -> float:
        """Apply the rates of this round's ``local_step``; returns the factor."""
        factor = lr_factor(self.schedule, self.first_step + local_step, self.total, self.warmup)
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * factor
        return factor
