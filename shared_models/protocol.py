"""The round's contract between the server and a site: every record, key and file name, typed.

Both sides import this module and nothing else to speak to each other: the
server writes a :class:`RoundConfig` with :meth:`RoundConfig.to_record`, the
ClientApp reads it back with :meth:`RoundConfig.from_record`; a site answers
with :class:`SiteInfo`, :class:`TrainMetrics` or :class:`EvalMetrics`. The
defaults live in the dataclasses below and nowhere else, so a key the server
leaves out means the same on both sides. Typed record reading lives in
:mod:`shared_models.records`, the site's data summary in :mod:`shared_models.site_summary`
(re-exported here: both are part of the contract).
"""

from __future__ import annotations

import math
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .partition import Policy
from .records import SITE_ID, ProtocolError, checked, read_fields, read_json
from .site_summary import (  # noqa: F401 -- part of the contract: a site's data summary
    FINGERPRINT_RECORD, FP_CLASS_FRACTIONS, FP_CLASSES, FP_INTENSITY, FP_INTENSITY_FOREGROUND, FP_NUM_CASES, FP_NUM_TRAIN,
    FP_SHAPE_MAX, FP_SHAPE_MEDIAN, FP_SHAPE_MIN, FP_SPACING, FP_SPATIAL_DIMS, INTENSITY_STATISTICS, IntensityStats,
    SiteFingerprint,
)

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
WITH_FINGERPRINT = "with-fingerprint"
EVAL_STATISTICS = "eval-statistics"
FINETUNE_EPOCHS = "finetune-epochs"
PERSONAL_MU = "personal-mu"  # Ditto: the personal model's pull toward the global one
NUM_ROUNDS = "num-rounds"  # the federation's length: the site's learning-rate schedule spans it
OPTIMIZER = "optimizer"
MOMENTUM = "momentum"
LR_SCHEDULE = "lr-schedule"
WARMUP_FRACTION = "warmup-fraction"
PERSIST_OPTIMIZER = "persist-optimizer"
AUGMENT = "augment"
PATCH_SIZE = "patch-size"
SIM_SITE_STATE = "site-state"  # a simulated cell's folder: one state dir per site under it
TARGET_SPACING = "target-spacing"
LOADER_WORKERS = "loader-workers"
TRANSPORT_DTYPE = "transport-dtype"  # the dtype shared floating tensors travel in (shared_models/transport.py)
# Values of EVAL_STATISTICS: re-estimate site statistics under the final weights, or score them as trained (the papers).
EVAL_STATISTICS_MODES = ("refresh", "stored")
# Values of OPTIMIZER and LR_SCHEDULE (the site's registries in client/optim_recipe.py and client/schedule.py).
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "poly", "cosine")

# Keys of a site's replies (site -> server).
N_TRAIN = "n-train"
N_TEST = "n-test"
N_REJECTED = "n-rejected"
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
LOSS = "loss"
TRAIN_SECONDS = "train-seconds"
SAMPLES_PER_SECOND = "samples-per-second"
APP_SECONDS = "app-seconds"
DICE = "dice"
DICE_PER_CLASS = "dice-per-class"
DICE_PER_CASE = "dice-per-case"  # flat, case-major: one value per (test case, foreground class)
HD95 = "hd95"
HD95_PER_CLASS = "hd95-per-class"
EVAL_SECONDS = "eval-seconds"
# Keys of a site's fingerprint (the query's FINGERPRINT record: a summary of its data, never an image).

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
PLAN_FILE = "plan.json"  # the plan derived from the sites' fingerprints, next to RESULTS_FILE




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
    # "96,96,64": train on random patches of this size and score with a sliding window over each case
    # (client.patch_pipeline); "": whole images, stacked once (the 2D benchmarks' fast path)
    patch_size: str = ""
    target_spacing: str = ""  # with patches: resample every case to this voxel size (mm, "1.5,1.5,3"); "": native
    loader_workers: int = 0  # with patches: DataLoader worker processes

    @property
    def patch_shape(self) -> tuple[int, ...]:
        return parse_sizes(self.patch_size, PATCH_SIZE, int)

    @property
    def target_spacing_mm(self) -> tuple[float, ...]:
        return parse_sizes(self.target_spacing, TARGET_SPACING, float)


def size_problem(values) -> str | None:
    """Why ``values`` is not a patch size or spacing (2 or 3 positive numbers), or None: the one rule for both
    a config's list and a round's comma-separated string."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return "expected numbers"
    if len(numbers) not in (2, 3) or any(v <= 0 for v in numbers):
        return "expected 2 or 3 positive sizes"
    return None


def check_sizes(values, key: str) -> None:
    """A config's ``patch-size``/``target-spacing``: empty, or 2 or 3 positive numbers (ConfigError naming ``key``)."""
    from .config import ConfigError

    if values and (problem := size_problem(values)):
        raise ConfigError(f"{key}: {problem} (or []), got {list(values)}")


def parse_sizes(text: str, key: str, kind: type) -> tuple:
    """ "96,96,64" -> (96, 96, 64); "" -> (); anything else non-positive or malformed is a ProtocolError naming ``key``."""
    if not text.strip():
        return ()
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError as exc:
        raise ProtocolError(f"{key}: expected comma-separated numbers, got {text!r}") from exc
    if problem := size_problem(values):
        raise ProtocolError(f"{key}: {problem}, got {text!r}")
    return values


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
    # evaluation: epochs of local fine-tuning of every tensor before scoring (personalisation; the server
    # asks for it at the final evaluation only); the fine-tuned model never leaves the site.
    # training: the rounds' learning-rate schedule spans these epochs after the last round
    finetune_epochs: int = 0
    # Ditto: > 0, every site also trains a personal model of its own each round, pulled toward the received
    # global model by (personal_mu / 2) ||v - w||^2, and is scored with it; the personal model never leaves the site
    personal_mu: float = 0.0
    with_fingerprint: bool = False  # query: the site also answers with its SiteFingerprint
    transport_dtype: str = "fp32"  # fp32 | fp16 | bf16, both ways; each side upcasts to its model's dtype on receipt

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
        train = TrainSettings(**read_fields(TrainSettings, _TRAIN_KEYS, record))
        values = read_fields(cls, _ROUND_KEYS, record)
        values["model_spec"] = read_json(record, MODEL, required=True)
        values["policy_overrides"] = read_json(record, POLICY_OVERRIDES, required=False)
        sites = checked(record, SIM_SITES, str) if SIM_SITES in record else ""
        return cls(**values, train=train, sim_sites=tuple(s for s in sites.split(",") if s))


_ROUND_KEYS = {
    RUN_NAME: "run_name", FINGERPRINT: "fingerprint", SERVER_ROUND: "server_round", POLICY: "policy",
    LOSS_NAME: "loss", INTENSITY: "intensity", TEST_FRACTION: "test_fraction", SPLIT_SEED: "split_seed",
    SIM_DATA_DIR: "sim_data_dir", SIM_STATE_DIR: "sim_state_dir", WITH_HD95: "with_hd95",
    EVAL_STATISTICS: "eval_statistics", FINETUNE_EPOCHS: "finetune_epochs", PERSONAL_MU: "personal_mu",
    WITH_FINGERPRINT: "with_fingerprint", NUM_ROUNDS: "num_rounds", TRANSPORT_DTYPE: "transport_dtype",
}
_TRAIN_KEYS = {
    LOCAL_EPOCHS: "epochs", LR: "lr", BATCH_SIZE: "batch_size", SEED: "seed", DEVICE: "device", AMP: "amp",
    CHANNELS_LAST: "channels_last", PROXIMAL_MU: "proximal_mu", WEIGHT_DECAY: "weight_decay",
    OPTIMIZER: "optimizer", MOMENTUM: "momentum", LR_SCHEDULE: "schedule", WARMUP_FRACTION: "warmup_fraction",
    PERSIST_OPTIMIZER: "persist_optimizer", AUGMENT: "augment", PATCH_SIZE: "patch_size",
    TARGET_SPACING: "target_spacing", LOADER_WORKERS: "loader_workers",
}


@dataclass(frozen=True)
class SiteInfo:
    """A site's answer to the query: who it is and how much data it has (never a tensor)."""

    site_id: str
    n_train: int
    n_test: int
    n_rejected: int = 0  # cases the site refused to read (each named in the site's own log)

    def to_record(self) -> dict[str, Any]:
        return {SITE_ID: self.site_id, N_TRAIN: self.n_train, N_TEST: self.n_test, N_REJECTED: self.n_rejected}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SiteInfo:
        return cls(**read_fields(cls, _SITE_KEYS, record))


_SITE_KEYS = {SITE_ID: "site_id", N_TRAIN: "n_train", N_TEST: "n_test", N_REJECTED: "n_rejected"}


@dataclass(frozen=True)
class TrainMetrics:
    """The MetricRecord of a training reply (``num-examples`` weights the aggregation)."""

    num_examples: int
    loss: float
    train_seconds: float
    samples_per_second: float = 0.0
    app_seconds: float = 0.0  # the whole ClientApp call: model build, state I/O, training, reply

    def to_record(self) -> dict[str, Any]:
        return {NUM_EXAMPLES: self.num_examples, LOSS: self.loss, TRAIN_SECONDS: self.train_seconds,
                SAMPLES_PER_SECOND: self.samples_per_second, APP_SECONDS: self.app_seconds}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainMetrics:
        return cls(**read_fields(cls, _TRAIN_METRIC_KEYS, record))


_TRAIN_METRIC_KEYS = {NUM_EXAMPLES: "num_examples", LOSS: "loss", TRAIN_SECONDS: "train_seconds", SAMPLES_PER_SECOND: "samples_per_second",
                      APP_SECONDS: "app_seconds"}


@dataclass(frozen=True)
class EvalMetrics:
    """The MetricRecord of an evaluation reply: the site's score on its own held-out split."""

    num_examples: int
    dice: float
    dice_per_class: tuple[float, ...] = ()
    hd95: float = float("nan")
    hd95_per_class: tuple[float, ...] = ()
    eval_seconds: float = 0.0
    dice_per_case: tuple[tuple[float, ...], ...] = ()  # per test case, per foreground class; NaN: class absent

    def to_record(self) -> dict[str, Any]:
        return {NUM_EXAMPLES: self.num_examples, DICE: self.dice, DICE_PER_CLASS: list(self.dice_per_class),
                HD95: self.hd95, HD95_PER_CLASS: list(self.hd95_per_class), EVAL_SECONDS: self.eval_seconds,
                DICE_PER_CASE: [v for row in self.dice_per_case for v in row]}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvalMetrics:
        values = read_fields(cls, _EVAL_SCALAR_KEYS, record)
        lists = {attr: tuple(float(v) for v in record.get(key, [])) for key, attr in _EVAL_LIST_KEYS.items()}
        flat, width = [float(v) for v in record.get(DICE_PER_CASE, [])], len(lists["dice_per_class"])
        if flat and (not width or len(flat) % width):
            raise ProtocolError(f"message key {DICE_PER_CASE!r}: {len(flat)} values do not fill rows of {width} classes")
        cases = tuple(tuple(flat[i:i + width]) for i in range(0, len(flat), width)) if flat else ()
        return cls(**values, **lists, dice_per_case=cases)

    def to_json(self) -> dict[str, Any]:
        """The per-site entry of ``federation.json`` (JSON has no NaN: an absent class is null)."""
        return {"dice": self.dice, "n_test": self.num_examples, "dice_per_class": list(self.dice_per_class),
                "hd95": self.hd95, "hd95_per_class": list(self.hd95_per_class),
                "dice_per_case": [[v if math.isfinite(v) else None for v in row] for row in self.dice_per_case]}


_EVAL_SCALAR_KEYS = {NUM_EXAMPLES: "num_examples", DICE: "dice", HD95: "hd95", EVAL_SECONDS: "eval_seconds"}
_EVAL_LIST_KEYS = {DICE_PER_CLASS: "dice_per_class", HD95_PER_CLASS: "hd95_per_class"}
