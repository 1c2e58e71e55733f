"""``server.yaml``: the schema of the central server's configuration, and the ServerApp run config it gives."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared_models.config import ConfigError
from shared_models.protocol import check_sizes
from shared_models.endpoint import EndpointSection

from .run_config import ServerRunConfig

_RUN = ServerRunConfig(model="{}")  # the federation's defaults are the run config's


@dataclass(frozen=True)
class SuperLinkSection:
    certfile: str
    keyfile: str
    ca_certfile: str
    host: str = "0.0.0.0"  # the public (Fleet-only) proxy's address
    port: int = 9092
    internal_port: int = 0  # the SuperLink's own port on 127.0.0.1 (0 = a free one at each start)
    public_address: str = ""
    database: str = "state/superlink.db"
    health_port: int = 0  # Flower's gRPC health service (0 = off)

    def __post_init__(self) -> None:
        if self.internal_port and self.internal_port == self.port:
            raise ConfigError(f"internal-port: must differ from port ({self.port}): the proxy listens there")


@dataclass(frozen=True)
class FederationSection:
    model: dict[str, Any]
    rounds: int = 20
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    policy: str = "fedbn"
    policy_overrides: dict[str, str] = field(default_factory=dict)
    loss: str = _RUN.loss
    local_epochs: int = _RUN.local_epochs
    lr: float = _RUN.lr
    optimizer: str = _RUN.optimizer  # adam | adamw | sgd (Nesterov, `momentum`)
    momentum: float = _RUN.momentum
    lr_schedule: str = _RUN.lr_schedule  # constant | poly | cosine over every round's local steps
    warmup_fraction: float = _RUN.warmup_fraction
    persist_optimizer: bool = _RUN.persist_optimizer  # the site keeps its optimizer state across rounds
    augment: bool = _RUN.augment
    patch_size: tuple[int, ...] = ()  # e.g. [96, 96, 64]: sites train on random patches; []: whole images
    target_spacing: tuple[float, ...] = ()  # with patches: every case resampled to this voxel size (mm)
    loader_workers: int = _RUN.loader_workers
    batch_size: int = _RUN.batch_size
    seed: int = _RUN.seed
    intensity: str = _RUN.intensity
    test_fraction: float = _RUN.test_fraction
    split_seed: int = _RUN.split_seed
    eval_statistics: str = _RUN.eval_statistics  # refresh | stored
    transport_dtype: str = _RUN.transport_dtype  # fp32 | fp16 | bf16: the dtype shared tensors travel in
    finetune_epochs: int = _RUN.finetune_epochs  # sites fine-tune the whole model before the final evaluation
    personal_mu: float = _RUN.personal_mu  # Ditto: sites also train personal models (pull toward the global model)
    device: str = _RUN.device  # a site's own `device` (site.yaml) takes precedence
    min_sites: int = 0  # sites to wait for at the start (0 = every provisioned site)
    min_train_sites: int = 1  # quorum of valid updates per round
    wait_seconds: float = 600.0
    round_timeout: float = 3600.0
    straggler_grace: float = 300.0
    payload_limit: float = _RUN.payload_limit  # the update gate's bounds (see server.validation.GateLimits)
    update_norm_bound: float = _RUN.update_norm_bound
    eval_every: int = 1

    def __post_init__(self) -> None:
        check_sizes(self.patch_size, "federation.patch-size")
        check_sizes(self.target_spacing, "federation.target-spacing")

@dataclass(frozen=True)
class ServerConfig:
    superlink: SuperLinkSection
    sites: dict[str, str]  # site id -> OpenSSH public key file
    federation: FederationSection
    work_dir: str = "work"
    run_name: str = "fedsite"
    stay_up: bool = False
    metrics: EndpointSection = EndpointSection(port=9400)


class DaemonError(RuntimeError):
    """The server cannot start or the run failed."""


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} fedsite server: {text}", flush=True)


def resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def run_config(cfg: ServerConfig, out_dir: Path, node_sites: dict[str, int] | None = None) -> dict[str, Any]:
    """The ServerApp's run_config: a :class:`ServerRunConfig`, serialised by its one serialiser.
    ``node_sites`` (site -> node id of its registered key) lets the ServerApp refuse a node that
    claims another site than its key's."""
    fed = cfg.federation
    return ServerRunConfig(
        model=json.dumps(fed.model),
        run_name=cfg.run_name,
        out_dir=str(out_dir),
        num_rounds=fed.rounds,
        local_epochs=fed.local_epochs,
        lr=fed.lr,
        optimizer=fed.optimizer,
        momentum=fed.momentum,
        lr_schedule=fed.lr_schedule,
        warmup_fraction=fed.warmup_fraction,
        persist_optimizer=fed.persist_optimizer,
        augment=fed.augment,
        patch_size=",".join(str(int(v)) for v in fed.patch_size),
        target_spacing=",".join(f"{float(v):g}" for v in fed.target_spacing),
        loader_workers=fed.loader_workers,
        batch_size=fed.batch_size,
        seed=fed.seed,
        loss=fed.loss,
        policy=fed.policy,
        policy_overrides=json.dumps(fed.policy_overrides),
        strategy=fed.strategy,
        strategy_options=json.dumps(fed.strategy_options),
        device=fed.device,
        intensity=fed.intensity,
        test_fraction=fed.test_fraction,
        split_seed=fed.split_seed,
        eval_statistics=fed.eval_statistics,
        transport_dtype=fed.transport_dtype,
        finetune_epochs=fed.finetune_epochs,
        personal_mu=fed.personal_mu,
        min_nodes=fed.min_sites or len(cfg.sites),
        min_train_nodes=fed.min_train_sites,
        wait_seconds=fed.wait_seconds,
        round_timeout=fed.round_timeout,
        straggler_grace=fed.straggler_grace,
        payload_limit=fed.payload_limit,
        update_norm_bound=fed.update_norm_bound,
        eval_every=fed.eval_every,
        resume=True,
        node_sites=json.dumps({str(node): site for site, node in (node_sites or {}).items()}),
    ).to_run_config()
