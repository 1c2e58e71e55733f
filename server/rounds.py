"""The federation's round loop: discover sites, train, aggregate, evaluate, checkpoint.

It follows Flower's ``Strategy.start`` (configure_train -> send_and_receive ->
aggregate_train -> evaluate), with what a long-running hospital federation
needs on top: a bounded wait for sites, a map from Flower node ids to site names,
per-site evaluation of the personalised models, a checkpoint after every round
and resumption at the round after the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from shared_models import architecture_fingerprint, build_model, partition
from shared_models import records as R
from shared_models.partition import Policy

from .checkpoint import CheckpointStore, ServerCheckpoint, arrays_to_tensors, restore_strategy_state, strategy_state, tensors_to_arrays
from .run_config import ServerRunConfig
from .strategy import TargetedGrid, aggregate_shared, make_strategy

log = logging.getLogger("fedsite.server")
POOLED_SITE = "pooled"


class FederationError(RuntimeError):
    """The federation cannot proceed (sites missing, every site failed...)."""


@dataclass
class FederationResult:
    """What a finished federation reports (written as JSON by the ServerApp)."""

    run_name: str
    policy: str
    strategy: str
    rounds: int
    sites: list[str]
    per_site: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    wall_s: float = 0.0
    resumed_from: int = 0

    @property
    def mean_dice(self) -> float:
        values = [v["dice"] for v in self.per_site.values() if math.isfinite(v["dice"])]
        return sum(values) / len(values) if values else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "mean_dice": self.mean_dice}


def wait_for_nodes(grid: Grid, expected: int, wait_seconds: float) -> list[int]:
    """Node ids once ``expected`` nodes are connected; bounded, unlike Flower's sampler."""
    deadline = time.monotonic() + wait_seconds
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected:
            return node_ids
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(node_ids)} of {expected} sites connected within {wait_seconds:.0f} s")
        time.sleep(0.05)


def _messages(record: RecordDict, node_ids: Iterable[int], message_type: str) -> list[Message]:
    return [Message(content=record, dst_node_id=n, message_type=message_type) for n in node_ids]


def _site_of(reply: Message, sites: dict[int, str]) -> str:
    return sites.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")


def discover_sites(grid: Grid, node_ids: list[int], config: dict[str, Any], timeout: float) -> dict[int, dict[str, Any]]:
    """Ask every node who it is (site id, dataset sizes); a failing site is fatal here."""
    record = RecordDict({R.CONFIG: ConfigRecord({**config, R.SERVER_ROUND: 0})})
    info: dict[int, dict[str, Any]] = {}
    for reply in grid.send_and_receive(_messages(record, node_ids, MessageType.QUERY), timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise FederationError(f"node {node} failed to describe its site: {reply.error.reason}")
        info[node] = dict(reply.content[R.CONFIG])
    missing = set(node_ids) - set(info)
    if missing:
        raise FederationError(f"nodes {sorted(missing)} did not answer the site query within {timeout:.0f} s")
    names = [i[R.SITE_ID] for i in info.values()]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise FederationError(f"two nodes claim the same site id(s) {sorted(dupes)}")
    return info


def _log_failures(replies: list[Message], sites: dict[int, str], phase: str, rnd: int) -> list[Message]:
    ok = []
    for reply in replies:
        if reply.has_error():
            log.warning("round %d %s: site %s failed: %s", rnd, phase, _site_of(reply, sites), reply.error.reason)
        else:
            ok.append(reply)
    return ok


def run_federation(grid: Grid, cfg: ServerRunConfig) -> FederationResult:
    """Run ``cfg.num_rounds`` rounds (resuming after the last checkpoint if any)."""
    started = time.perf_counter()
    policy = Policy.parse(cfg.policy, json.loads(cfg.policy_overrides))
    model = build_model(cfg.model_spec, seed=cfg.seed)
    fingerprint = architecture_fingerprint(model)
    split = partition(model, policy)
    state = model.state_dict()
    global_arrays = ArrayRecord({k: state[k] for k in split.shared})
    base_config = cfg.client_config(fingerprint)
    fingerprints = {json.dumps(cfg.model_spec, sort_keys=True): fingerprint}

    expected = cfg.min_nodes or (len(cfg.site_list) + (1 if cfg.pooled else 0)) or 1
    node_ids = wait_for_nodes(grid, expected, cfg.wait_seconds)
    info = discover_sites(grid, node_ids, base_config, cfg.round_timeout)
    sites = {n: i[R.SITE_ID] for n, i in info.items()}
    eval_nodes = sorted((n for n, s in sites.items() if s != POOLED_SITE), key=lambda n: sites[n])
    train_nodes = [n for n, s in sites.items() if s == POOLED_SITE] if cfg.pooled else eval_nodes
    if not train_nodes:
        raise FederationError("pooled training requested but no pooled node connected" if cfg.pooled else "no site connected")
    log.info("sites: %s", ", ".join(f"{sites[n]} ({info[n][R.N_TRAIN]} train / {info[n][R.N_TEST]} test)" for n in sorted(sites, key=sites.get)))
    log.info("policy %s: %d shared, %d site-local tensors; strategy %s", policy.name, len(split.shared), len(split.local), cfg.strategy)

    strategy = make_strategy(cfg.strategy, len(train_nodes), json.loads(cfg.strategy_options))
    result = FederationResult(cfg.run_name, policy.name, cfg.strategy, cfg.num_rounds, [sites[n] for n in eval_nodes])
    checkpoints = CheckpointStore(Path(cfg.out_dir) / "checkpoints", keep=cfg.checkpoint_keep)
    first_round = 1
    if cfg.resume:
        ckpt = checkpoints.latest(run_name=cfg.run_name, fingerprint=fingerprint, policy=policy.name)
        if ckpt is not None:
            global_arrays = tensors_to_arrays(ckpt.arrays)
            restore_strategy_state(strategy, ckpt.strategy_state)
            result.history = list(ckpt.history)
            first_round = result.resumed_from = ckpt.round + 1
            log.info("resuming after the round-%d checkpoint", ckpt.round)

    for rnd in range(first_round, cfg.num_rounds + 1):
        spec = cfg.model_spec_at(rnd)
        config = ConfigRecord({**base_config, R.SERVER_ROUND: rnd, "proximal-mu": cfg.proximal_mu,
                               "model": json.dumps(spec), R.FINGERPRINT: scheduled_fingerprint(spec, split, policy, fingerprints)})
        messages = list(strategy.configure_train(rnd, global_arrays, config, TargetedGrid(grid, train_nodes)))
        result.bytes_sent += global_arrays.count_bytes() * len(messages)
        replies = _log_failures(list(grid.send_and_receive(messages, timeout=cfg.round_timeout)), sites, "train", rnd)
        if not replies:
            raise FederationError(f"round {rnd}: every site failed to train")
        result.bytes_received += sum(r.content[R.ARRAYS].count_bytes() for r in replies)
        t_agg = time.perf_counter()
        aggregated, _ = aggregate_shared(strategy, rnd, replies, global_arrays)
        if aggregated is not None:
            global_arrays = aggregated
        entry: dict[str, Any] = {
            "round": rnd,
            "train_sites": sorted(_site_of(r, sites) for r in replies),
            "train_loss": {_site_of(r, sites): float(r.content[R.METRICS][R.LOSS]) for r in replies},
            "aggregate_s": time.perf_counter() - t_agg,
        }
        if rnd % cfg.eval_every == 0 or rnd == cfg.num_rounds:
            entry["dice"] = evaluate_sites(grid, global_arrays, config, eval_nodes, sites, cfg.round_timeout, result)
        result.history.append(entry)
        checkpoints.save(
            ServerCheckpoint(rnd, cfg.run_name, fingerprint, policy.name, arrays_to_tensors(global_arrays), strategy_state(strategy), result.history)
        )
        dice = entry.get("dice", {})
        mean = sum(dice.values()) / len(dice) if dice else float("nan")
        log.info("round %d/%d: train loss %.4f, mean Dice %.4f %s", rnd, cfg.num_rounds,
                 sum(entry["train_loss"].values()) / len(entry["train_loss"]), mean,
                 " ".join(f"{s}={d:.3f}" for s, d in sorted(dice.items())))
    if result.history and "dice" in result.history[-1] and not result.per_site:
        # Resumed after the final round: the per-site table is the last evaluation.
        result.per_site = {s: {"dice": d} for s, d in result.history[-1]["dice"].items()}
    result.wall_s = time.perf_counter() - started
    return result


def scheduled_fingerprint(spec: dict[str, Any], split: Any, policy: Policy, cache: dict[str, str]) -> str:
    """Fingerprint of a scheduled spec; its shared/local keys must not change."""
    key = json.dumps(spec, sort_keys=True)
    if key not in cache:
        model = build_model(spec)
        new_split = partition(model, policy)
        if (new_split.shared, new_split.local) != (split.shared, split.local):
            raise FederationError(f"model schedule changes the model's tensors ({spec}); only behaviour may change between rounds")
        cache[key] = architecture_fingerprint(model)
    return cache[key]


def evaluate_sites(
    grid: Grid, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], sites: dict[int, str], timeout: float, result: FederationResult
) -> dict[str, float]:
    """Each site scores its personalised model on its own held-out split."""
    record = RecordDict({R.ARRAYS: arrays, R.CONFIG: config})
    messages = _messages(record, nodes, MessageType.EVALUATE)
    result.bytes_sent += arrays.count_bytes() * len(messages)
    replies = _log_failures(list(grid.send_and_receive(messages, timeout=timeout)), sites, "evaluate", int(config[R.SERVER_ROUND]))
    dice = {}
    for reply in replies:
        site = _site_of(reply, sites)
        metrics = reply.content[R.METRICS]
        dice[site] = float(metrics[R.DICE])
        result.per_site[site] = {
            "dice": float(metrics[R.DICE]),
            "n_test": int(metrics[R.NUM_EXAMPLES]),
            "dice_per_class": [float(v) for v in metrics["dice-per-class"]],
        }
    return dice
