"""Personalisation by local fine-tuning at the end of a federation.

The federated model is a starting point; a few epochs of training on the site's
own data then adapt every tensor (shared ones included) to that site. This is
the strong, simple personalisation baseline of the FL literature under feature
shift. The fine-tuned model is written to the site's store only: the evaluation
reply carries metrics, never a tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from shared_models.losses import make_loss
from shared_models.protocol import RoundConfig, TrainSettings

from .optim_state import StoredOptimizer
from .schedule import TailPosition
from .site_state import PERSONAL_FILE, SiteStateStore
from .trainer import BatchSource, TrainReport, train_batches

# A seed stream of its own: fine-tuning never replays a training round's shuffle.
_FINETUNE_SEED_OFFSET = 7_919


def finetune_settings(cfg: RoundConfig):
    """The fine-tuning run: the round's settings, ``finetune_epochs`` long, no proximal pull to the global model."""
    return dataclasses.replace(cfg.train, epochs=cfg.finetune_epochs, proximal_mu=0.0,
                               seed=cfg.train.seed * 100_003 + cfg.server_round + _FINETUNE_SEED_OFFSET)


def finetune(model: torch.nn.Module, batches: Callable[[TrainSettings], BatchSource], cfg: RoundConfig,
             optimizer_state: StoredOptimizer | None = None) -> TrainReport:
    """Train every tensor of ``model`` in place on the site's training split (``batches(settings)``).

    The fine-tuning is the tail of the rounds' learning-rate schedule (their schedule
    spans it, see :class:`client.schedule.RoundPosition`) and continues the site's
    optimizer state: restarting both at the base rate would undo the federated model.
    """
    settings = finetune_settings(cfg)
    position = TailPosition(cfg.num_rounds, cfg.train.epochs, cfg.finetune_epochs)
    return train_batches(model, batches(settings), settings, make_loss(cfg.loss, model, seed=settings.seed),
                         position=position, optimizer_state=optimizer_state)


def personal_store(state_dir, run_name: str, site: str) -> SiteStateStore:
    return SiteStateStore(state_dir, run_name, site, PERSONAL_FILE)
