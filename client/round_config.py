"""What a site needs to run one round, read from the server's ConfigRecord.

The server sends the full recipe (model spec, policy, optimiser settings) with
every message, so a site daemon needs no copy of the experiment configuration
and every site provably trains the same architecture. Where the *data* and the
*state* live is the site's own business: a deployed SuperNode names them in its
``--node-config``; only a simulated node (which has a ``partition-id`` instead)
takes them from the message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_models.partition import Policy

from .trainer import TrainSettings

SIM_PARTITION_KEY = "partition-id"
POOLED_SITE = "pooled"


class RoundConfigError(ValueError):
    """The server's config record lacks a key or carries a malformed value."""


@dataclass(frozen=True)
class RoundConfig:
    """Typed view of the ConfigRecord of one train/evaluate message."""

    server_round: int
    run_name: str
    model_spec: dict[str, Any]
    policy: Policy
    fingerprint: str
    loss: str
    train: TrainSettings
    intensity: str
    test_fraction: float
    split_seed: int
    sim_sites: tuple[str, ...]
    sim_data_dir: str
    sim_state_dir: str

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundConfig:
        def get(key: str, kind: type, default: Any = None) -> Any:
            if key not in record:
                if default is None:
                    raise RoundConfigError(f"server config is missing key {key!r}")
                return default
            value = record[key]
            if kind is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, kind):
                raise RoundConfigError(f"server config key {key!r}: expected {kind.__name__}, got {value!r}")
            return value

        try:
            spec = json.loads(get("model", str))
            overrides = json.loads(get("policy-overrides", str, "{}"))
        except json.JSONDecodeError as exc:
            raise RoundConfigError(f"server config: model/policy-overrides is not valid JSON: {exc}") from exc
        sites = get("sim-sites", str, "")
        return cls(
            server_round=get("server-round", int),
            run_name=get("run-name", str),
            model_spec=spec,
            policy=Policy.parse(get("policy", str), overrides),
            fingerprint=get("fingerprint", str),
            loss=get("loss", str, "dicece"),
            train=TrainSettings(
                epochs=get("local-epochs", int),
                lr=get("lr", float),
                batch_size=get("batch-size", int),
                seed=get("seed", int),
                device=get("device", str, "cpu"),
                amp=get("amp", bool, True),
                channels_last=get("channels-last", bool, True),
                proximal_mu=get("proximal-mu", float, 0.0),
            ),
            intensity=get("intensity", str, "zscore"),
            test_fraction=get("test-fraction", float, 0.25),
            split_seed=get("split-seed", int, 0),
            sim_sites=tuple(s for s in sites.split(",") if s),
            sim_data_dir=get("sim-data-dir", str, ""),
            sim_state_dir=get("sim-state-dir", str, ""),
        )


@dataclass(frozen=True)
class SitePaths:
    """Who this node is and where its data and durable state live."""

    site: str
    data_dir: Path  # the site's own folder (images/, labels/); for the pooled node, the multi-site root
    state_dir: Path
    pooled_sites: tuple[str, ...] = ()  # non-empty only for the simulated pooled-training node


def resolve_site(node_config: Mapping[str, Any], cfg: RoundConfig) -> SitePaths:
    """Site identity from ``--node-config`` (deployment) or partition-id (simulation)."""
    if "site-id" in node_config:
        missing = [k for k in ("data-dir", "state-dir") if k not in node_config]
        if missing:
            raise RoundConfigError(f"site {node_config['site-id']}: node config lacks {', '.join(missing)}")
        return SitePaths(str(node_config["site-id"]), Path(str(node_config["data-dir"])), Path(str(node_config["state-dir"])))
    if SIM_PARTITION_KEY not in node_config:
        raise RoundConfigError("node config has neither 'site-id' (deployment) nor 'partition-id' (simulation)")
    pid = int(node_config[SIM_PARTITION_KEY])
    if not cfg.sim_sites or not cfg.sim_data_dir or not cfg.sim_state_dir:
        raise RoundConfigError("simulated node: the server did not send sim-sites/sim-data-dir/sim-state-dir")
    root, state_root = Path(cfg.sim_data_dir), Path(cfg.sim_state_dir)
    if pid < len(cfg.sim_sites):
        site = cfg.sim_sites[pid]
        return SitePaths(site, root / site, state_root / site)
    if pid == len(cfg.sim_sites):
        return SitePaths(POOLED_SITE, root, state_root / POOLED_SITE, pooled_sites=cfg.sim_sites)
    raise RoundConfigError(f"simulated node with partition-id {pid} but only {len(cfg.sim_sites)} sites (+1 pooled)")
