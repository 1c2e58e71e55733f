"""Ditto (Li et al., ICML 2021): a personal model at each site beside the federated one.

Each round the site first trains the federation's model as every method does (its
shared tensors are the reply). It then trains its own whole model for the same
epochs, with the pull ``(mu / 2) ||v - w||^2`` toward the global model it received.
mu -> 0 gives local training, and a large mu ties the personal model to the global one.
The personal model, its optimizer state and its score stay at the site, in the
durable site store. Evaluation scores the personal model and `fedsite predict`
loads it. Nothing of it is ever sent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

from shared_models.losses import make_loss
from shared_models.protocol import RoundConfig, TrainSettings

from .optim_state import OptimizerStateStore
from .personalise import personal_store
from .schedule import round_position, round_settings
from .site_paths import SitePaths
from .trainer import BatchSource, TrainReport, train_batches

PERSONAL_OPTIMIZER_FILE = "personal_optimizer_state.pt"


def personal_settings(cfg: RoundConfig) -> TrainSettings:
    """The round's settings (the ``local`` method's draws, see ``round_settings``) with Ditto's pull as the proximal term."""
    return dataclasses.replace(round_settings(cfg), proximal_mu=cfg.personal_mu)


def train_personal(model: torch.nn.Module, global_shared: Mapping[str, torch.Tensor],
                   batches: Callable[[TrainSettings], BatchSource], cfg: RoundConfig, paths: SitePaths,
                   fingerprint: str) -> TrainReport:
    """Train the site's personal model one round, in place of ``model``'s tensors.

    ``model`` holds the round's starting model (the received global + the site's
    local tensors): the first round's personal model starts there, later rounds from
    the stored one. ``global_shared`` is the global model this round received.
    """
    store = personal_store(paths.state_dir, cfg.run_name, paths.site)
    if store.exists():
        tensors, _ = store.load(fingerprint=fingerprint, policy=cfg.policy, expected_keys=set(model.state_dict()),
                                before_round=cfg.server_round)
        model.load_state_dict(tensors)
    settings = personal_settings(cfg)
    optim_store = OptimizerStateStore(paths.state_dir, cfg.run_name, paths.site, PERSONAL_OPTIMIZER_FILE)
    stored = optim_store.load(fingerprint=fingerprint, optimizer=settings.optimizer,
                              before_round=cfg.server_round) if settings.persist_optimizer else None
    report = train_batches(model, batches(settings), settings, make_loss(cfg.loss, model, seed=settings.seed), global_shared,
                           position=round_position(cfg), optimizer_state=stored)
    if settings.persist_optimizer:
        optim_store.save(report.optimizer_state, fingerprint=fingerprint, optimizer=settings.optimizer, round_=cfg.server_round)
    store.save(model.state_dict(), fingerprint=fingerprint, policy=cfg.policy, round_=cfg.server_round)
    return report


def load_personal(model: torch.nn.Module, cfg: RoundConfig, paths: SitePaths, fingerprint: str) -> None:
    """Put the personal model the site trained up to this round into ``model`` (every tensor)."""
    tensors, _ = personal_store(paths.state_dir, cfg.run_name, paths.site).load(
        fingerprint=fingerprint, policy=cfg.policy, expected_keys=set(model.state_dict()), before_round=cfg.server_round + 1)
    model.load_state_dict(tensors)
