"""Experiment configuration: YAML -> typed object; command-line flags override it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from shared_models.config import ConfigError, from_dict, load_yaml

from shared_models.losses import LOSSES
from shared_models.protocol import EVAL_STATISTICS_MODES, LR_SCHEDULES, OPTIMIZERS, TrainSettings, check_sizes
from shared_models.transport import TRANSPORT_DTYPES

from .methods import METHODS

DEFAULT_CONFIG = "default.yaml"
_TRAIN = TrainSettings()  # the local-training defaults are the round contract's


@dataclass(frozen=True)
class SyntheticData:
    """The built-in domain-shift generator (simulations/domain_shift.py)."""

    cases_per_site: int = 40
    spatial_dims: int = 2
    size: tuple[int, ...] = (48, 48)
    num_classes: int = 4
    seed: int = 0
    sites: int = 4


@dataclass(frozen=True)
class AnatomyData:
    """Real MRI anatomy (MNI152 tissue maps shipped by nilearn) + scanner profiles."""

    sites: int = 4
    cases_per_site: int = 40
    spatial_dims: int = 2
    size: tuple[int, ...] = (48, 48)
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """A folder per site on disk (``dir``), the real-anatomy set, or the synthetic generator."""

    dir: str | None = None
    sites: tuple[str, ...] = ()  # empty = every site folder found in ``dir``
    anatomy: AnatomyData | None = None
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    intensity: str = "zscore"
    test_fraction: float = 0.25
    split_seed: int = 0


@dataclass(frozen=True)
class Resources:
    """Share of the machine each simulated site gets (Ray resources)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class Arm:
    """One compared configuration: a federated method plus model/policy variations.

    ``model`` is merged into the experiment's model spec (e.g. ``{norm: iln}``);
    ``model_schedule`` changes the spec from a given round on (e.g. DualNorm-UNet's
    ``{11: {stage: dual}}`` for the two-stage recipe).
    """

    method: str
    name: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    policy_overrides: dict[str, str] = field(default_factory=dict)
    model_schedule: dict[int, dict[str, Any]] = field(default_factory=dict)
    loss: str | None = None  # None = the experiment's loss

    def __post_init__(self) -> None:
        if self.loss is not None and self.loss not in LOSSES:
            raise ConfigError(f"loss: unknown loss {self.loss!r} (known: {', '.join(LOSSES)})")
        if self.method not in METHODS:
            raise ConfigError(f"method: unknown method {self.method!r} (known: {', '.join(METHODS)})")

    @property
    def label(self) -> str:
        return self.name or self.method


@dataclass(frozen=True)
class ExperimentConfig:
    """Arms (methods and their variants) x seeds on one dataset and one base model."""

    name: str = "domain-shift"
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] | None = None  # None or a partial spec: the rest from the data's plan (simulations/planning.py)
    methods: tuple[str, ...] = ("local", "fedavg", "fedbn", "ditto", "pooled")
    arms: tuple[Arm, ...] = ()  # explicit variants; compared after the plain ``methods``
    datasets: dict[str, DataConfig] = field(default_factory=dict)  # matrix axis; empty = just ``data``
    models: tuple[dict[str, Any], ...] = ()  # matrix axis: spec overrides, e.g. {name: segnetr}
    norms: tuple[str, ...] = ()  # matrix axis: norm of every arm's model
    holdout: str | None = None  # a site that never trains; scored after adaptation
    adapt_options: tuple[str, ...] = ("average", "adabn", "sn-batch-average")
    seeds: tuple[int, ...] = (0, 1)
    rounds: int = 10
    local_epochs: int = 1
    lr: float | None = None  # None: from the data's plan
    pooled_lr: float | None = None  # the pooled arm's; None: ``lr`` (a planned ``lr`` plans this too)
    optimizer: str = _TRAIN.optimizer  # adam | adamw | sgd
    momentum: float = _TRAIN.momentum  # sgd only
    lr_schedule: str = _TRAIN.schedule  # constant | poly | cosine
    warmup_fraction: float = _TRAIN.warmup_fraction
    persist_optimizer: bool = _TRAIN.persist_optimizer  # False: a fresh optimizer every round
    augment: bool = _TRAIN.augment
    batch_size: int | None = None  # None: from the data's plan
    # random patches of this size (sliding-window scoring); [] whole images; None: from the plan (3D: patches)
    patch_size: tuple[int, ...] | None = None
    target_spacing: tuple[float, ...] | None = None  # with patches, mm per axis; [] native; None: from the plan
    loader_workers: int = 0
    loss: str = "dicece"
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    transport_dtype: str = "fp32"  # fp32 | fp16 | bf16: the dtype shared tensors travel in, both ways
    eval_statistics: str = "refresh"  # refresh: site statistics re-estimated under the final weights; stored: as the papers
    client_resources: Resources = field(default_factory=Resources)
    # a running Ray cluster (HOST:PORT) the simulated sites run on; "": a local Ray instance of this run's own
    ray_address: str = ""
    parallel_cells: int = 1  # federations run at the same time (each its own process and Ray); 0: as many as the cores hold

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"methods: unknown method(s) {unknown} (known: {', '.join(METHODS)})")
        if not (self.methods or self.arms) or not self.seeds:
            raise ConfigError("give at least one method or arm, and at least one seed")
        labels = [a.label for a in self.all_arms]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ConfigError(f"arms: duplicate arm name(s) {dupes}; give each variant a distinct name")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss: unknown loss {self.loss!r} (known: {', '.join(LOSSES)})")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ConfigError("rounds and local-epochs must be >= 1")
        if self.parallel_cells < 0:
            raise ConfigError(f"parallel-cells: expected 0 (automatic) or a count >= 1, got {self.parallel_cells}")
        if self.eval_statistics not in EVAL_STATISTICS_MODES:
            raise ConfigError(f"eval-statistics: expected one of {list(EVAL_STATISTICS_MODES)}, got {self.eval_statistics!r}")
        for key, choices in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES), ("transport_dtype", TRANSPORT_DTYPES)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key.replace('_', '-')}: expected one of {list(choices)}, got {getattr(self, key)!r}")
        for key in ("lr", "pooled_lr"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ConfigError(f"{key.replace('_', '-')}: must be > 0, got {getattr(self, key)}")
        check_sizes(self.patch_size, "patch-size")
        check_sizes(self.target_spacing, "target-spacing")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")


    @property
    def all_arms(self) -> tuple[Arm, ...]:
        return tuple(Arm(method=m) for m in self.methods) + tuple(self.arms)

    @property
    def all_datasets(self) -> dict[str, DataConfig]:
        return dict(self.datasets) or {"data": self.data}

    def cells(self) -> list[Cell]:
        """The matrix: datasets x models x norms x arms x seeds, in run order."""
        models = self.models or ({},)
        norms = self.norms or (None,)
        out = []
        for dataset in self.all_datasets:
            for variant in models:
                for norm in norms:
                    for arm in self.all_arms:
                        label = arm.label
                        if len(models) > 1:
                            label += "-" + str(variant.get("name", (self.model or {}).get("name")))
                        if len(norms) > 1:
                            label += f"-{norm}"
                        spec = {**(self.model or {}), **variant, **({"norm": norm} if norm else {}), **arm.model}
                        for seed in self.seeds:
                            out.append(Cell(dataset, label, arm, spec, seed))
        return out


@dataclass(frozen=True)
class Cell:
    """One federation of the matrix."""

    dataset: str
    label: str  # the row of the report ("method")
    arm: Arm
    model: dict[str, Any]
    seed: int

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"


def load_experiment(path: str | Path | None) -> ExperimentConfig:
    """The YAML at ``path``, or the embedded default experiment."""
    if path is None:
        text = resources.files("simulations.configs").joinpath(DEFAULT_CONFIG).read_text()
        import yaml

        return from_dict(ExperimentConfig, yaml.safe_load(text))
    try:
        return from_dict(ExperimentConfig, load_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def with_overrides(cfg: ExperimentConfig, **flags: Any) -> ExperimentConfig:
    """Apply command-line flags that were given (``None`` = not given)."""
    changes = {k: v for k, v in flags.items() if v is not None and k not in ("data_dir", "norm", "model_name")}
    if flags.get("data_dir") is not None:
        changes["data"] = replace(cfg.data, dir=str(flags["data_dir"]), sites=())
        changes["datasets"] = {}  # --data replaces the dataset axis
    if flags.get("methods") is not None:
        changes["arms"] = ()  # --methods replaces the whole comparison
    model = None if cfg.model is None else dict(cfg.model)
    if flags.get("model_name") is not None:
        model = model or {}
        model["name"] = flags["model_name"]
    if flags.get("norm") is not None:
        model = model or {}
        model["norm"] = flags["norm"]
    changes["model"] = model
    try:
        return replace(cfg, **changes)
    except ConfigError:
        raise
