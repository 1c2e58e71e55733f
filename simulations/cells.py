"""A finished federation on disk, and each site's personalised model rebuilt from it.

A cell folder (``OUT/runs/<arm>-seed<k>``) holds ``federation.json`` (the run
config and results), ``checkpoints/`` (global shared tensors per round) and
``site-state/<site>/`` (each simulated site's local tensors). Reports and
adaptation read models through this module only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.exchange import load_local
from client.site_state import SiteStateStore
from server.checkpoint import CheckpointStore, ServerCheckpoint
from server.run_config import ServerRunConfig
from shared_models import architecture_fingerprint, build_model, partition
from shared_models.partition import Policy, Split
from shared_models.protocol import FEDERATION_FILE


@dataclass(frozen=True)
class Cell:
    """One finished (arm, seed) federation."""

    path: Path

    @cached_property
    def result(self) -> dict[str, Any]:
        file = self.path / FEDERATION_FILE
        if not file.exists():
            raise FileNotFoundError(f"{file}: no finished federation here")
        result = json.loads(file.read_text())
        if "config" not in result:
            raise ValueError(f"{file}: written by an older fedsite without its run config; run the cell again")
        return result

    @cached_property
    def config(self) -> ServerRunConfig:
        return ServerRunConfig.from_run_config(self.result["config"])

    @property
    def sites(self) -> list[str]:
        return list(self.result["sites"])

    @cached_property
    def policy(self) -> Policy:
        return Policy.parse(self.config.policy, json.loads(self.config.policy_overrides))

    def model_spec(self) -> dict[str, Any]:
        """The spec in force after the last round (model schedules included)."""
        return self.config.model_spec_at(self.config.num_rounds)

    def build(self) -> tuple[nn.Module, Split, str]:
        model = build_model(self.model_spec(), seed=self.config.seed)
        return model, partition(model, self.policy), architecture_fingerprint(model)

    def checkpoint(self, fingerprint: str) -> ServerCheckpoint:
        """The last server checkpoint (global shared tensors after the final round)."""
        store = CheckpointStore(self.path / "checkpoints")
        ckpt = store.latest(run_name=self.config.run_name, fingerprint=fingerprint, policy=self.policy.name)
        if ckpt is None:
            raise FileNotFoundError(f"{self.path / 'checkpoints'}: no checkpoint")
        return ckpt

    def global_tensors(self, fingerprint: str) -> dict[str, torch.Tensor]:
        return self.checkpoint(fingerprint).arrays

    def site_store(self, site: str) -> SiteStateStore:
        return SiteStateStore(Path(self.config.state_dir) / site, self.config.run_name, site)

    def local_tensors(self, site: str, split: Split, fingerprint: str) -> dict[str, torch.Tensor]:
        if not split.local:
            return {}
        tensors, _ = self.site_store(site).load(fingerprint=fingerprint, policy=self.policy.name, expected_keys=set(split.local))
        return tensors

    def personalised_model(self, site: str) -> nn.Module:
        """Global shared tensors + ``site``'s own local tensors, in eval mode."""
        model, split, fingerprint = self.build()
        load_local(model, {**self.global_tensors(fingerprint), **self.local_tensors(site, split, fingerprint)})
        return model.eval()
