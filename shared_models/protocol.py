"""The round's contract between the server and a site: every record, key and file name, typed.

Both sides import this module and nothing else to speak to each other: the
server writes a :class:`RoundConfig` with :meth:`RoundConfig.to_record`, the
ClientApp reads it back with :meth:`RoundConfig.from_record`; a site answers
with :class:`SiteInfo`, :class:`TrainMetrics` or :class:`EvalMetrics`. The
defaults live in the dataclasses below and nowhere else, so a key the server
leaves out means the same on both sides.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .partition import Policy

# Records of a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Keys of the round's ConfigRecord (server -> site).
SERVER_ROUND = "server-round"  # also written by Flower's strategies
RUN_NAME = "run-name"
MODEL = "model"
FINGERPRINT = "fingerprint"
POLICY = "policy"
POLICY_OVERRIDES = "policy-overrides"
LOSS_NAME = "loss"
LOCAL_EPOCHS = "local-epochs"
LR = "lr"
BATCH_SIZE = "batch-size"
SEED = "seed"
DEVICE = "device"
AMP = "amp"
CHANNELS_LAST = "channels-last"
PROXIMAL_MU = "proximal-mu"  # the key Flower's FedProx writes
WEIGHT_DECAY = "weight-decay"
INTENSITY = "intensity"
TEST_FRACTION = "test-fraction"
SPLIT_SEED = "split-seed"
SIM_SITES = "sim-sites"
SIM_DATA_DIR = "sim-data-dir"
SIM_STATE_DIR = "sim-state-dir"
WITH_HD95 = "with-hd95"
EVAL_STATISTICS = "eval-statistics"
NUM_ROUNDS = "num-rounds"  # the federation's length: the site's learning-rate schedule spans it
OPTIMIZER = "optimizer"
MOMENTUM = "momentum"
LR_SCHEDULE = "lr-schedule"
WARMUP_FRACTION = "warmup-fraction"
PERSIST_OPTIMIZER = "persist-optimizer"
AUGMENT = "augment"
# Values of EVAL_STATISTICS: re-estimate site statistics under the final weights, or score them as trained (the papers).
EVAL_STATISTICS_MODES = ("refresh", "stored")
# Values of OPTIMIZER and LR_SCHEDULE (the site's registries in client/optim_recipe.py and client/schedule.py).
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "poly", "cosine")

# Keys of a site's replies (site -> server).
SITE_ID = "site-id"
N_TRAIN = "n-train"
N_TEST = "n-test"
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
LOSS = "loss"
TRAIN_SECONDS = "train-seconds"
SAMPLES_PER_SECOND = "samples-per-second"
DICE = "dice"
DICE_PER_CLASS = "dice-per-class"
HD95 = "hd95"
HD95_PER_CLASS = "hd95-per-class"
EVAL_SECONDS = "eval-seconds"

# A SuperNode's --node-config: a deployed site names itself and its folders, a simulated node has a partition id.
NODE_SITE_ID = "site-id"
NODE_DATA_DIR = "data-dir"
NODE_STATE_DIR = "state-dir"
NODE_DEVICE = "device"
SIM_PARTITION_KEY = "partition-id"
# The pooled-training node's site name (simulation's centralised upper bound).
POOLED_SITE = "pooled"

# Result files.
FEDERATION_FILE = "federation.json"  # what one finished federation reports (the ServerApp writes it)
RESULTS_FILE = "results.json"  # a summary over federations (a deployment's or an experiment's)
STATUS_FILE = "status.json"  # the live round status the server's metrics endpoint reads


class ProtocolError(ValueError):
    """A message lacks a key or carries a malformed value."""


@dataclass(frozen=True)
class TrainSettings:
    """What one round of local training does (sent by the server each round)."""

    epochs: int = 1
    lr: float = 3e-3
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # only takes effect on CUDA
    channels_last: bool = True  # only takes effect on CUDA
    proximal_mu: float = 0.0  # FedProx; 0 = plain local SGD
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw | sgd (Nesterov); its state persists at the site across rounds
    momentum: float = 0.99  # sgd only (nnU-Net's)
    schedule: str = "poly"  # constant | poly | cosine, over the federation's local steps
    # linear warm-up over this share of the schedule; 0: Adam's bias correction already damps the first steps
    warmup_fraction: float = 0.0
    persist_optimizer: bool = True  # False: a fresh optimizer every round
    augment: bool = True  # MONAI spatial + intensity augmentation of training batches (never at evaluation)


@dataclass(frozen=True)
class RoundConfig:
    """The ConfigRecord of one query/train/evaluate message, typed."""

    run_name: str
    model_spec: dict[str, Any]
    fingerprint: str
    server_round: int = 0
    num_rounds: int = 0  # 0 = unknown: the schedule then ends with the current round
    policy: str = "fedbn"
    policy_overrides: dict[str, str] = field(default_factory=dict)
    loss: str = "dicece"
    train: TrainSettings = TrainSettings()
    intensity: str = "zscore"
    test_fraction: float = 0.25
    split_seed: int = 0
    sim_sites: tuple[str, ...] = ()  # simulation only: site names in partition-id order
    sim_data_dir: str = ""
    sim_state_dir: str = ""
    with_hd95: bool = True  # evaluation: surface distances cost, the server asks for them at the end
    # evaluation: "refresh" re-estimates site-local norm statistics under the final weights before scoring;
    # "stored" scores with the statistics of the last local training (what the papers report)
    eval_statistics: str = "refresh"

    @property
    def partition_policy(self) -> Policy:
        return Policy.parse(self.policy, self.policy_overrides)

    def to_record(self) -> dict[str, Any]:
        """Flat scalars for a ConfigRecord; the spec and overrides travel as JSON."""
        record: dict[str, Any] = {key: getattr(self, attr) for key, attr in _ROUND_KEYS.items()}
        record.update({key: getattr(self.train, attr) for key, attr in _TRAIN_KEYS.items()})
        record[MODEL] = json.dumps(self.model_spec)
        record[POLICY_OVERRIDES] = json.dumps(self.policy_overrides)
        record[SIM_SITES] = ",".join(self.sim_sites)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundConfig:
        """Read a ConfigRecord; a missing key takes the default above, a malformed one is an error."""
        train = TrainSettings(**_read_fields(TrainSettings, _TRAIN_KEYS, record))
        values = _read_fields(cls, _ROUND_KEYS, record)
        values["model_spec"] = _read_json(record, MODEL, required=True)
        values["policy_overrides"] = _read_json(record, POLICY_OVERRIDES, required=False)
        sites = _checked(record, SIM_SITES, str) if SIM_SITES in record else ""
        return cls(**values, train=train, sim_sites=tuple(s for s in sites.split(",") if s))


_ROUND_KEYS = {
    RUN_NAME: "run_name", FINGERPRINT: "fingerprint", SERVER_ROUND: "server_round", POLICY: "policy",
    LOSS_NAME: "loss", INTENSITY: "intensity", TEST_FRACTION: "test_fraction", SPLIT_SEED: "split_seed",
    SIM_DATA_DIR: "sim_data_dir", SIM_STATE_DIR: "sim_state_dir", WITH_HD95: "with_hd95",
    EVAL_STATISTICS: "eval_statistics", NUM_ROUNDS: "num_rounds",
}
_TRAIN_KEYS = {
    LOCAL_EPOCHS: "epochs", LR: "lr", BATCH_SIZE: "batch_size", SEED: "seed", DEVICE: "device", AMP: "amp",
    CHANNELS_LAST: "channels_last", PROXIMAL_MU: "proximal_mu", WEIGHT_DECAY: "weight_decay",
    OPTIMIZER: "optimizer", MOMENTUM: "momentum", LR_SCHEDULE: "schedule", WARMUP_FRACTION: "warmup_fraction",
    PERSIST_OPTIMIZER: "persist_optimizer", AUGMENT: "augment",
}


def _checked(record: Mapping[str, Any], key: str, kind: type) -> Any:
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"message key {key!r}: expected {kind.__name__}, got {value!r}")
    return value


def _read_fields(cls: type, keys: Mapping[str, str], record: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar fields of ``cls`` present in ``record``; absent required ones are an error."""
    hints = typing.get_type_hints(cls)
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    values = {}
    for key, attr in keys.items():
        if key in record:
            values[attr] = _checked(record, key, hints[attr])
        elif attr in required:
            raise ProtocolError(f"message is missing key {key!r}")
    return values


def _read_json(record: Mapping[str, Any], key: str, required: bool) -> dict[str, Any]:
    if key not in record:
        if required:
            raise ProtocolError(f"message is missing key {key!r}")
        return {}
    try:
        value = json.loads(_checked(record, key, str))
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"message key {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"message key {key!r}: expected a JSON object, got {value!r}")
    return value


@dataclass(frozen=True)
class SiteInfo:
    """A site's answer to the query: who it is and how much data it has (never a tensor)."""

    site_id: str
    n_train: int
    n_test: int

    def to_record(self) -> dict[str, Any]:
        return {SITE_ID: self.site_id, N_TRAIN: self.n_train, N_TEST: self.n_test}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SiteInfo:
        return cls(**_read_fields(cls, _SITE_KEYS, record))


_SITE_KEYS = {SITE_ID: "site_id", N_TRAIN: "n_train", N_TEST: "n_test"}


@dataclass(frozen=True)
class TrainMetrics:
    """The MetricRecord of a training reply (``num-examples`` weights the aggregation)."""

    num_examples: int
    loss: float
    train_seconds: float
    samples_per_second: float = 0.0

    def to_record(self) -> dict[str, Any]:
        return {NUM_EXAMPLES: self.num_examples, LOSS: self.loss, TRAIN_SECONDS: self.train_seconds,
                SAMPLES_PER_SECOND: self.samples_per_second}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainMetrics:
        return cls(**_read_fields(cls, _TRAIN_METRIC_KEYS, record))


_TRAIN_METRIC_KEYS = {NUM_EXAMPLES: "num_examples", LOSS: "loss", TRAIN_SECONDS: "train_seconds", SAMPLES_PER_SECOND: "samples_per_second"}


@dataclass(frozen=True)
class EvalMetrics:
    """The MetricRecord of an evaluation reply: the site's score on its own held-out split."""

    num_examples: int
    dice: float
    dice_per_class: tuple[float, ...] = ()
    hd95: float = float("nan")
    hd95_per_class: tuple[float, ...] = ()
    eval_seconds: float = 0.0

    def to_record(self) -> dict[str, Any]:
        return {NUM_EXAMPLES: self.num_examples, DICE: self.dice, DICE_PER_CLASS: list(self.dice_per_class),
                HD95: self.hd95, HD95_PER_CLASS: list(self.hd95_per_class), EVAL_SECONDS: self.eval_seconds}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvalMetrics:
        values = _read_fields(cls, _EVAL_SCALAR_KEYS, record)
        lists = {attr: tuple(float(v) for v in record.get(key, [])) for key, attr in _EVAL_LIST_KEYS.items()}
        return cls(**values, **lists)

    def to_json(self) -> dict[str, Any]:
        """The per-site entry of ``federation.json``."""
        return {"dice": self.dice, "n_test": self.num_examples, "dice_per_class": list(self.dice_per_class),
                "hd95": self.hd95, "hd95_per_class": list(self.hd95_per_class)}


_EVAL_SCALAR_KEYS = {NUM_EXAMPLES: "num_examples", DICE: "dice", HD95: "hd95", EVAL_SECONDS: "eval_seconds"}
_EVAL_LIST_KEYS = {DICE_PER_CLASS: "dice_per_class", HD95_PER_CLASS: "hd95_per_class"}
