"""The ServerApp's run configuration (Flower run_config -> typed, validated)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared_models.config import ConfigError, from_dict, to_dict


@dataclass(frozen=True)
class ServerRunConfig:
    """One federation. Flat, because Flower's run_config holds scalars only:
    the model spec and the policy/strategy options travel as JSON strings."""

    model: str
    run_name: str = "fedsite"
    out_dir: str = "runs/fedsite"
    num_rounds: int = 3
    local_epochs: int = 1
    lr: float = 3e-3
    batch_size: int = 8
    seed: int = 0
    loss: str = "dicece"
    model_schedule: str = "{}"  # JSON {round: {spec changes from that round on}}
    policy: str = "fedbn"
    policy_overrides: str = "{}"
    strategy: str = "fedavg"
    strategy_options: str = "{}"
    proximal_mu: float = 0.0
    device: str = "cpu"
    amp: bool = True
    channels_last: bool = True
    intensity: str = "zscore"
    test_fraction: float = 0.25
    split_seed: int = 0
    pooled: bool = False
    data_dir: str = ""  # simulation only: the multi-site root the simulated nodes read
    sites: str = ""  # simulation only: comma-separated site names, partition-id order
    state_dir: str = ""  # simulation only: where simulated sites keep their local state
    min_nodes: int = 0  # 0 = every site must connect
    wait_seconds: float = 120.0
    round_timeout: float = 900.0
    min_train_nodes: int = 1  # quorum: valid updates a round needs to change the global model
    straggler_grace: float = -1.0  # once a quorum replied, wait at most this long for the rest (< 0: wait for all)
    eval_every: int = 1
    resume: bool = True
    checkpoint_keep: int = 3

    def __post_init__(self) -> None:
        for key in ("num_rounds", "local_epochs", "batch_size", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')}: must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        for key in ("model", "model_schedule", "policy_overrides", "strategy_options"):
            try:
                value = json.loads(getattr(self, key))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key.replace('_', '-')}: not valid JSON ({exc})") from exc
            if not isinstance(value, dict):
                raise ConfigError(f"{key.replace('_', '-')}: expected a JSON object")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerRunConfig:
        return from_dict(cls, dict(run_config), path="run-config")

    def to_run_config(self) -> dict[str, Any]:
        """Flower's flat run_config (kebab-case keys): the one serialiser every writer uses."""
        return to_dict(self)

    @property
    def model_spec(self) -> dict[str, Any]:
        return json.loads(self.model)

    def model_spec_at(self, server_round: int) -> dict[str, Any]:
        """The model spec in force at ``server_round`` (base spec + schedule up to it)."""
        spec = self.model_spec
        schedule = json.loads(self.model_schedule)
        for start in sorted(schedule, key=int):
            if int(start) <= server_round:
                spec.update(schedule[start])
        return spec

    @property
    def site_list(self) -> list[str]:
        return [s for s in self.sites.split(",") if s]

    def client_config(self, fingerprint: str) -> dict[str, Any]:
        """The ConfigRecord content every train/evaluate/query message carries."""
        return {
            "run-name": self.run_name,
            "model": self.model,
            "fingerprint": fingerprint,
            "loss": self.loss,
            "policy": self.policy,
            "policy-overrides": self.policy_overrides,
            "local-epochs": self.local_epochs,
            "lr": self.lr,
            "batch-size": self.batch_size,
            "seed": self.seed,
            "device": self.device,
            "amp": self.amp,
            "channels-last": self.channels_last,
            "proximal-mu": self.proximal_mu,
            "intensity": self.intensity,
            "test-fraction": self.test_fraction,
            "split-seed": self.split_seed,
            "sim-sites": self.sites,
            "sim-data-dir": self.data_dir,
            "sim-state-dir": self.state_dir,
        }
