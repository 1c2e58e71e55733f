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
import math
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
WITH_FINGERPRINT = "with-fingerprint"
EVAL_STATISTICS = "eval-statistics"
FINETUNE_EPOCHS = "finetune-epochs"
NUM_ROUNDS = "num-rounds"  # the federation's length: the site's learning-rate schedule spans it
OPTIMIZER = "optimizer"
MOMENTUM = "momentum"
LR_SCHEDULE = "lr-schedule"
WARMUP_FRACTION = "warmup-fraction"
PERSIST_OPTIMIZER = "persist-optimizer"
AUGMENT = "augment"
TRANSPORT_DTYPE = "transport-dtype"  # the dtype shared floating tensors travel in (shared_models/transport.py)
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
DICE_PER_CASE = "dice-per-case"  # flat, case-major: one value per (test case, foreground class)
HD95 = "hd95"
HD95_PER_CLASS = "hd95-per-class"
EVAL_SECONDS = "eval-seconds"
# Keys of a site's fingerprint (the query's FINGERPRINT record: a summary of its data, never an image).
FINGERPRINT_RECORD = "fingerprint"
FP_NUM_CASES = "num-cases"
FP_NUM_TRAIN = "num-train"
FP_SPATIAL_DIMS = "spatial-dims"
FP_SHAPE_MEDIAN = "shape-median"
FP_SHAPE_MIN = "shape-min"
FP_SHAPE_MAX = "shape-max"
FP_SPACING = "spacing"
FP_CLASSES = "classes"
FP_CLASS_FRACTIONS = "class-fractions"
FP_INTENSITY = "intensity-all"  # a list in INTENSITY_STATISTICS order
FP_INTENSITY_FOREGROUND = "intensity-foreground"  # the same over label > 0
# The intensity statistics of a fingerprint, in record order.
INTENSITY_STATISTICS = ("mean", "std", "p00_5", "p50", "p99_5")

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
    # evaluation: epochs of local fine-tuning of every tensor before scoring (personalisation; the server
    # asks for it at the final evaluation only); the fine-tuned model never leaves the site
    finetune_epochs: int = 0
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
    EVAL_STATISTICS: "eval_statistics", FINETUNE_EPOCHS: "finetune_epochs",
    WITH_FINGERPRINT: "with_fingerprint", NUM_ROUNDS: "num_rounds", TRANSPORT_DTYPE: "transport_dtype",
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
    dice_per_case: tuple[tuple[float, ...], ...] = ()  # per test case, per foreground class; NaN: class absent

    def to_record(self) -> dict[str, Any]:
        return {NUM_EXAMPLES: self.num_examples, DICE: self.dice, DICE_PER_CLASS: list(self.dice_per_class),
                HD95: self.hd95, HD95_PER_CLASS: list(self.hd95_per_class), EVAL_SECONDS: self.eval_seconds,
                DICE_PER_CASE: [v for row in self.dice_per_case for v in row]}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvalMetrics:
        values = _read_fields(cls, _EVAL_SCALAR_KEYS, record)
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


@dataclass(frozen=True)
class IntensityStats:
    """Summary of a site's image intensities (raw, before z-scoring)."""

    mean: float
    std: float
    p00_5: float
    p50: float
    p99_5: float

    def to_list(self) -> list[float]:
        return [float(getattr(self, name)) for name in INTENSITY_STATISTICS]

    @classmethod
    def from_list(cls, values: list[float]) -> IntensityStats:
        if len(values) != len(INTENSITY_STATISTICS):
            raise ProtocolError(f"intensity statistics: expected {len(INTENSITY_STATISTICS)} values, got {len(values)}")
        return cls(*(float(v) for v in values))


@dataclass(frozen=True)
class SiteFingerprint:
    """What a planner may know of a site's data: counts, shapes, spacing, classes, intensities.

    Shapes and spacing are per spatial axis; ``class_fractions[i]`` is the share of all
    voxels labelled ``classes[i]``. Aggregates only: no image, label or per-case value.
    """

    site_id: str
    num_cases: int
    num_train: int
    spatial_dims: int
    shape_median: tuple[int, ...]
    shape_min: tuple[int, ...]
    shape_max: tuple[int, ...]
    spacing: tuple[float, ...]
    classes: tuple[int, ...]
    class_fractions: tuple[float, ...]
    intensity: IntensityStats
    intensity_foreground: IntensityStats

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {SITE_ID: self.site_id, FP_NUM_CASES: self.num_cases, FP_NUM_TRAIN: self.num_train,
                                  FP_SPATIAL_DIMS: self.spatial_dims, FP_INTENSITY: self.intensity.to_list(),
                                  FP_INTENSITY_FOREGROUND: self.intensity_foreground.to_list()}
        for key, (attr, kind) in _FP_LISTS.items():
            record[key] = [kind(v) for v in getattr(self, attr)]
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SiteFingerprint:
        values = _read_fields(cls, _FP_SCALARS, record)
        for key, (attr, kind) in _FP_LISTS.items():
            values[attr] = tuple(_checked_list(record, key, kind))
        values["intensity"] = IntensityStats.from_list(_checked_list(record, FP_INTENSITY, float))
        values["intensity_foreground"] = IntensityStats.from_list(_checked_list(record, FP_INTENSITY_FOREGROUND, float))
        return cls(**values)


_FP_SCALARS = {SITE_ID: "site_id", FP_NUM_CASES: "num_cases", FP_NUM_TRAIN: "num_train", FP_SPATIAL_DIMS: "spatial_dims"}
_FP_LISTS = {
    FP_SHAPE_MEDIAN: ("shape_median", int), FP_SHAPE_MIN: ("shape_min", int), FP_SHAPE_MAX: ("shape_max", int),
    FP_SPACING: ("spacing", float), FP_CLASSES: ("classes", int), FP_CLASS_FRACTIONS: ("class_fractions", float),
}


def _checked_list(record: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    """A list of ``kind`` (ints accepted as floats); a missing key or another type is an error."""
    if key not in record:
        raise ProtocolError(f"message is missing key {key!r}")
    values = record[key]
    if not isinstance(values, list | tuple):
        raise ProtocolError(f"message key {key!r}: expected a list, got {values!r}")
    return [_checked({key: v}, key, kind) for v in values]
