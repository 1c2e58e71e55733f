"""The ServerApp's run configuration (Flower run_config -> typed, validated)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared_models.config import ConfigError, from_dict, to_dict
from shared_models.protocol import EVAL_STATISTICS_MODES, LR_SCHEDULES, OPTIMIZERS, RoundConfig, TrainSettings
from shared_models.transport import TRANSPORT_DTYPES

_TRAIN = TrainSettings()
_ROUND = RoundConfig(run_name="", model_spec={}, fingerprint="")


@dataclass(frozen=True)
class ServerRunConfig:
    """One federation. Flat, because Flower's run_config holds scalars only:
    the model spec and the policy/strategy options travel as JSON strings."""

    model: str
    run_name: str = "fedsite"
    out_dir: str = "runs/fedsite"
    num_rounds: int = 3
    local_epochs: int = _TRAIN.epochs
    lr: float = _TRAIN.lr
    optimizer: str = _TRAIN.optimizer  # adam | adamw | sgd
    momentum: float = _TRAIN.momentum  # sgd only
    lr_schedule: str = _TRAIN.schedule  # constant | poly | cosine, over every round's local steps
    warmup_fraction: float = _TRAIN.warmup_fraction
    persist_optimizer: bool = _TRAIN.persist_optimizer
    augment: bool = _TRAIN.augment
    patch_size: str = _TRAIN.patch_size  # "96,96,64": train on patches (client.patch_pipeline); "": whole images
    target_spacing: str = _TRAIN.target_spacing  # with patches: "1.5,1.5,3" mm; "": each case's own
    loader_workers: int = _TRAIN.loader_workers
    batch_size: int = _TRAIN.batch_size
    seed: int = _TRAIN.seed
    loss: str = _ROUND.loss
    model_schedule: str = "{}"  # JSON {round: {spec changes from that round on}}
    policy: str = _ROUND.policy
    policy_overrides: str = "{}"
    strategy: str = "fedavg"
    strategy_options: str = "{}"
    proximal_mu: float = _TRAIN.proximal_mu
    device: str = _TRAIN.device
    amp: bool = _TRAIN.amp
    channels_last: bool = _TRAIN.channels_last
    intensity: str = _ROUND.intensity
    test_fraction: float = _ROUND.test_fraction
    split_seed: int = _ROUND.split_seed
    eval_statistics: str = _ROUND.eval_statistics  # refresh | stored (see shared_models.protocol.RoundConfig)
    transport_dtype: str = _ROUND.transport_dtype  # fp32 | fp16 | bf16: the dtype shared tensors travel in
    finetune_epochs: int = 0  # personalisation: local fine-tuning epochs before the final evaluation
    personal_mu: float = 0.0  # personalisation (Ditto): > 0, sites train and are scored with personal models
    pooled: bool = False
    data_dir: str = ""  # simulation only: the multi-site root the simulated nodes read
    sites: str = ""  # simulation only: comma-separated site names, partition-id order
    state_dir: str = ""  # simulation only: where simulated sites keep their local state
    node_sites: str = "{}"  # deployment: JSON {node id: site its key was registered under}; "{}" trusts the claims
    min_nodes: int = 0  # 0 = every site must connect
    wait_seconds: float = 120.0
    round_timeout: float = 900.0
    min_train_nodes: int = 1  # quorum: valid updates a round needs to change the global model
    straggler_grace: float = -1.0  # once a quorum replied, wait at most this long for the rest (< 0: wait for all)
    payload_limit: float = 1.5  # the gate refuses a reply of more array bytes than this x the shared model's (0: off)
    update_norm_bound: float = 10.0  # ... and an update longer than this x the round's median update (0: off)
    eval_every: int = 1
    resume: bool = True
    checkpoint_keep: int = 3

    def __post_init__(self) -> None:
        for key in ("num_rounds", "local_epochs", "batch_size", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')}: must be >= 1, got {getattr(self, key)}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"finetune-epochs: must be >= 0, got {self.finetune_epochs}")
        if self.personal_mu < 0:
            raise ConfigError(f"personal-mu: must be >= 0, got {self.personal_mu}")
        if self.eval_statistics not in EVAL_STATISTICS_MODES:
            raise ConfigError(f"eval-statistics: expected one of {list(EVAL_STATISTICS_MODES)}, got {self.eval_statistics!r}")
        for key in ("payload_limit", "update_norm_bound"):
            if getattr(self, key) != 0 and getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')}: must be 0 (off) or >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        for key, choices in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES), ("transport_dtype", TRANSPORT_DTYPES)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key.replace('_', '-')}: expected one of {list(choices)}, got {getattr(self, key)!r}")
        for key in ("momentum", "warmup_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key.replace('_', '-')}: must be in [0, 1), got {getattr(self, key)}")
        for key in ("model", "model_schedule", "policy_overrides", "strategy_options", "node_sites"):
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
    def registered_sites(self) -> dict[int, str]:
        """Node id -> the site name its key was registered under (empty in simulation)."""
        return {int(node): str(site) for node, site in json.loads(self.node_sites).items()}

    @property
    def site_list(self) -> list[str]:
        return [s for s in self.sites.split(",") if s]

    def round_config(self, fingerprint: str) -> RoundConfig:
        """The round's configuration every query/train/evaluate message carries (round 0 until set)."""
        return RoundConfig(
            run_name=self.run_name,
            model_spec=self.model_spec,
            fingerprint=fingerprint,
            num_rounds=self.num_rounds,
            policy=self.policy,
            policy_overrides=json.loads(self.policy_overrides),
            loss=self.loss,
            train=TrainSettings(
                epochs=self.local_epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed, device=self.device,
                amp=self.amp, channels_last=self.channels_last, proximal_mu=self.proximal_mu,
                optimizer=self.optimizer, momentum=self.momentum, schedule=self.lr_schedule,
                warmup_fraction=self.warmup_fraction, persist_optimizer=self.persist_optimizer, augment=self.augment,
                patch_size=self.patch_size, target_spacing=self.target_spacing, loader_workers=self.loader_workers,
            ),
            intensity=self.intensity,
            test_fraction=self.test_fraction,
            split_seed=self.split_seed,
            eval_statistics=self.eval_statistics,
            transport_dtype=self.transport_dtype,
            finetune_epochs=self.finetune_epochs,  # training: the schedule spans them; evaluation: only the final one fine-tunes
            personal_mu=self.personal_mu,
            sim_sites=tuple(self.site_list),
            sim_data_dir=self.data_dir,
            sim_state_dir=self.state_dir,
        )
