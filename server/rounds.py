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
from shared_models.config import to_dict
from shared_models.partition import Policy

from . import metrics as M
from .checkpoint import CheckpointStore, ServerCheckpoint, arrays_to_tensors, restore_strategy_state, strategy_state, tensors_to_arrays
from .run_config import ServerRunConfig
from .strategy import TargetedGrid, aggregate_shared, make_strategy
from .validation import check_aggregate, gate

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
    config: dict[str, Any] = field(default_factory=dict)  # the run config, to rebuild any site's model later

    @property
    def mean_dice(self) -> float:
        values = [v["dice"] for v in self.per_site.values() if math.isfinite(v["dice"])]
        return sum(values) / len(values) if values else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "mean_dice": self.mean_dice}


def wait_for_nodes(grid: Grid, expected: int, wait_seconds: float, minimum: int | None = None) -> list[int]:
    """Node ids once ``expected`` nodes are connected; bounded, unlike Flower's sampler.

    After ``wait_seconds`` the federation starts with the nodes that are there if
    they are at least ``minimum`` (default: ``expected``), and fails otherwise.
    """
    deadline = time.monotonic() + wait_seconds
    minimum = expected if minimum is None else minimum
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected:
            return node_ids
        if time.monotonic() > deadline:
            if node_ids and len(node_ids) >= minimum:
                log.warning("only %d of %d sites connected within %.0f s; starting with them", len(node_ids), expected, wait_seconds)
                return node_ids
            raise FederationError(f"only {len(node_ids)} of {expected} sites connected within {wait_seconds:.0f} s")
        time.sleep(0.05)


def online_targets(grid: Grid, nodes: list[int], quorum: int, wait_seconds: float) -> list[int]:
    """The ``nodes`` that are online now; waits (bounded) until at least ``quorum`` are."""
    deadline = time.monotonic() + wait_seconds
    while True:
        online = set(grid.get_node_ids())
        targets = [n for n in nodes if n in online]
        if len(targets) >= min(quorum, len(nodes)):
            return targets
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(targets)} of {len(nodes)} sites online, quorum is {quorum} (waited {wait_seconds:.0f} s)")
        time.sleep(0.5)


def collect_replies(
    grid: Grid, messages: list[Message], timeout: float, quorum: int, grace: float, poll: float = 0.5
) -> tuple[list[Message], list[int]]:
    """Push ``messages`` and pull replies until all arrived, or ``grace`` seconds after
    ``quorum`` successful replies (``grace`` < 0: no early close), or ``timeout``.

    A node that dies mid-round comes back as an error reply (Flower's
    NODE_UNAVAILABLE, after 2 missed heartbeats) whose source is the SuperLink,
    so every reply's ``src_node_id`` is set to the node the message went to.
    Returns the replies and the nodes that sent none.
    """
    targets = [m.metadata.dst_node_id for m in messages]
    ids = list(grid.push_messages(messages))
    origin = {mid: node for mid, node in zip(ids, targets) if mid}
    pending = set(origin)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    quorum_at = None
    while pending:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            pending.discard(mid)
            if reply.has_error() and mid in origin and reply.metadata.src_node_id != origin[mid]:
                reply.metadata.__dict__["_src_node_id"] = origin[mid]  # a SuperLink error reply: name the node
            replies.append(reply)
        now = time.monotonic()
        if quorum_at is None and sum(not r.has_error() for r in replies) >= quorum:
            quorum_at = now
        if not pending or now >= deadline or (grace >= 0 and quorum_at is not None and now - quorum_at >= grace):
            break
        time.sleep(poll)
    return replies, sorted({origin[m] for m in pending} | {n for n, mid in zip(targets, ids) if not mid})


def _messages(record: RecordDict, node_ids: Iterable[int], message_type: str) -> list[Message]:
    return [Message(content=record, dst_node_id=n, message_type=message_type) for n in node_ids]


def _site_of(reply: Message, sites: dict[int, str]) -> str:
    return _site_of_node(reply.metadata.src_node_id, sites)


def _site_of_node(node: int, sites: dict[int, str]) -> str:
    return sites.get(node, f"node-{node}")


def discover_sites(grid: Grid, node_ids: list[int], config: dict[str, Any], timeout: float) -> dict[int, dict[str, Any]]:
    """Ask every node who it is (site id, dataset sizes); a failing site is fatal here."""
    record = RecordDict({R.CONFIG: ConfigRecord({**config, R.SERVER_ROUND: 0})})
    info: dict[int, dict[str, Any]] = {}
    replies, _ = collect_replies(grid, _messages(record, node_ids, MessageType.QUERY), timeout, len(node_ids), -1)
    for reply in replies:
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


def admit_new_nodes(
    grid: Grid, sites: dict[int, str], info: dict[int, dict[str, Any]], ignored: set[int], config: dict[str, Any], timeout: float
) -> dict[int, int]:
    """Identify nodes that connected after the start (a new site, or a known site
    that came back under a new node id); returns {new node: node it replaces or 0}."""
    online = set(grid.get_node_ids())
    new = sorted(online - set(sites) - ignored)
    if not new:
        return {}
    record = RecordDict({R.CONFIG: ConfigRecord({**config, R.SERVER_ROUND: 0})})
    replies, _ = collect_replies(grid, _messages(record, new, MessageType.QUERY), timeout, len(new), -1)
    admitted: dict[int, int] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d failed to describe its site, ignored: %s", node, reply.error.reason)
            ignored.add(node)
            continue
        site = reply.content[R.CONFIG][R.SITE_ID]
        old = next((n for n, s in sites.items() if s == site), 0)
        if old and old in online:
            log.warning("node %d claims site %s, which node %d (online) already is; ignored", node, site, old)
            ignored.add(node)
            continue
        sites[node], info[node] = site, dict(reply.content[R.CONFIG])
        if old:
            del sites[old], info[old]
        admitted[node] = old
        log.info("site %s joined as node %d%s", site, node, f" (was node {old})" if old else "")
    return admitted


def _log_failures(replies: list[Message], sites: dict[int, str], phase: str, rnd: int) -> list[Message]:
    ok = []
    for reply in replies:
        if reply.has_error():
            log.warning("round %d %s: site %s failed: %s", rnd, phase, _site_of(reply, sites), reply.error.reason)
        else:
            ok.append(reply)
    return ok


def _ensure_logging() -> None:
    """In Flower's ServerApp process nothing configures logging: show our progress."""
    fedsite = logging.getLogger("fedsite")
    if not fedsite.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        fedsite.addHandler(handler)
        fedsite.setLevel(logging.INFO)
        fedsite.propagate = False


def run_federation(grid: Grid, cfg: ServerRunConfig) -> FederationResult:
    """Run ``cfg.num_rounds`` rounds (resuming after the last checkpoint if any)."""
    _ensure_logging()
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
    node_ids = wait_for_nodes(grid, expected, cfg.wait_seconds, minimum=min(expected, max(1, cfg.min_train_nodes)))
    info = discover_sites(grid, node_ids, base_config, cfg.round_timeout)
    sites = {n: i[R.SITE_ID] for n, i in info.items()}
    eval_nodes = sorted((n for n, s in sites.items() if s != POOLED_SITE), key=lambda n: sites[n])
    train_nodes = [n for n, s in sites.items() if s == POOLED_SITE] if cfg.pooled else list(eval_nodes)
    if not train_nodes:
        raise FederationError("pooled training requested but no pooled node connected" if cfg.pooled else "no site connected")
    log.info("sites: %s", ", ".join(f"{sites[n]} ({info[n][R.N_TRAIN]} train / {info[n][R.N_TEST]} test)" for n in sorted(sites, key=sites.get)))
    log.info("policy %s: %d shared, %d site-local tensors; strategy %s", policy.name, len(split.shared), len(split.local), cfg.strategy)

    max_examples = {n: int(i[R.N_TRAIN]) for n, i in info.items() if R.N_TRAIN in i}
    ignored: set[int] = set()
    strategy = make_strategy(cfg.strategy, len(train_nodes), json.loads(cfg.strategy_options))
    result = FederationResult(cfg.run_name, policy.name, cfg.strategy, cfg.num_rounds, [sites[n] for n in eval_nodes], config=to_dict(cfg))
    checkpoints = CheckpointStore(Path(cfg.out_dir) / "checkpoints", keep=cfg.checkpoint_keep)
    first_round = 1
    if cfg.resume:
        ckpt = checkpoints.latest(run_name=cfg.run_name, fingerprint=fingerprint, policy=policy.name)
        if ckpt is not None:
            global_arrays = tensors_to_arrays(ckpt.arrays)
            restore_strategy_state(strategy, ckpt.strategy_state)
            result.history = list(ckpt.history)
            first_round = result.resumed_from = ckpt.round + 1
            result.bytes_sent = sum(int(e.get("bytes_sent", 0)) for e in result.history)
            result.bytes_received = sum(int(e.get("bytes_received", 0)) for e in result.history)
            log.info("resuming after the round-%d checkpoint", ckpt.round)

    for rnd in range(first_round, cfg.num_rounds + 1):
        spec = cfg.model_spec_at(rnd)
        config = ConfigRecord({**base_config, R.SERVER_ROUND: rnd, "proximal-mu": cfg.proximal_mu,
                               "model": json.dumps(spec), R.FINGERPRINT: scheduled_fingerprint(spec, split, policy, fingerprints)})
        if not cfg.pooled:
            for node, old in admit_new_nodes(grid, sites, info, ignored, base_config, cfg.round_timeout).items():
                for nodes in (train_nodes, eval_nodes):
                    nodes[:] = [node if n == old else n for n in nodes] if old else [*nodes, node]
                max_examples[node] = int(info[node][R.N_TRAIN])
                if sites[node] not in result.sites:
                    result.sites.append(sites[node])
        quorum = min(max(1, cfg.min_train_nodes), len(train_nodes))
        targets = online_targets(grid, train_nodes, quorum, cfg.wait_seconds)
        t_round = time.perf_counter()
        sent0, received0 = result.bytes_sent, result.bytes_received
        # Flower's sampler waits without bound for min_available_nodes: ask for exactly the targets.
        strategy.min_train_nodes = strategy.min_available_nodes = len(targets)
        messages = list(strategy.configure_train(rnd, global_arrays, config, TargetedGrid(grid, targets)))
        result.bytes_sent += global_arrays.count_bytes() * len(messages)
        raw, missing = collect_replies(grid, messages, cfg.round_timeout, quorum, cfg.straggler_grace)
        # Replies arrive in completion order; a fixed (site) order makes the float sums of
        # the aggregation, and so the whole federation, reproducible run to run.
        replies = sorted(_log_failures(raw, sites, "train", rnd), key=lambda r: _site_of(r, sites))
        result.bytes_received += sum(r.content[R.ARRAYS].count_bytes() for r in replies if R.ARRAYS in r.content)
        # Update validation: nothing malformed, non-finite or implausible reaches a strategy.
        replies, rejections = gate(replies, global_arrays, str(config[R.FINGERPRINT]), max_examples, lambda r: _site_of(r, sites))
        for rej in rejections:
            log.warning("round %d: rejected the update of site %s: %s", rnd, rej.site, rej.reason)
        entry: dict[str, Any] = {
            "round": rnd,
            "train_sites": sorted(_site_of(r, sites) for r in replies),
            "train_loss": {_site_of(r, sites): float(r.content[R.METRICS].get(R.LOSS, float("nan"))) for r in replies},
            "rejected": {rej.site: rej.reason for rej in rejections},
            "failed": sorted(_site_of(r, sites) for r in raw if r.has_error()),
            "no_reply": sorted(_site_of_node(n, sites) for n in missing),
            "offline": sorted(sites[n] for n in train_nodes if n not in targets),
        }
        t_agg = time.perf_counter()
        if len(replies) < quorum:
            entry["skipped"] = f"{len(replies)} valid update(s), quorum is {quorum}"
            log.warning("round %d: skipped, global model unchanged (%s)", rnd, entry["skipped"])
        else:
            try:
                aggregated, _ = aggregate_shared(strategy, rnd, replies, global_arrays)
            except Exception as exc:  # a strategy error must not end a long federation
                aggregated = None
                entry["skipped"] = f"aggregation failed: {exc.__class__.__name__}: {exc}"
                log.error("round %d: %s; global model unchanged", rnd, entry["skipped"])
            if aggregated is not None and (bad := check_aggregate(aggregated)):
                entry["skipped"], aggregated = f"aggregate not finite ({bad})", None
                log.error("round %d: %s; global model unchanged", rnd, entry["skipped"])
            if aggregated is not None:
                global_arrays = aggregated
        entry["aggregate_s"] = time.perf_counter() - t_agg
        entry["train_s"] = t_agg - t_round
        if rnd % cfg.eval_every == 0 or rnd == cfg.num_rounds:
            online = set(grid.get_node_ids())
            eval_config = ConfigRecord({**config, "with-hd95": rnd == cfg.num_rounds})
            entry["dice"] = evaluate_sites(grid, global_arrays, eval_config, [n for n in eval_nodes if n in online], sites, cfg.round_timeout, result)
        entry["bytes_sent"] = result.bytes_sent - sent0
        entry["bytes_received"] = result.bytes_received - received0
        result.history.append(entry)
        checkpoints.save(
            ServerCheckpoint(rnd, cfg.run_name, fingerprint, policy.name, arrays_to_tensors(global_arrays), strategy_state(strategy), result.history)
        )
        M.write_status(Path(cfg.out_dir), M.round_status(result.to_json(), entry, cfg.num_rounds))
        dice = entry.get("dice", {})
        mean = sum(dice.values()) / len(dice) if dice else float("nan")
        losses = entry["train_loss"]
        log.info("round %d/%d: %d site(s), train loss %.4f, mean Dice %.4f %s", rnd, cfg.num_rounds, len(losses),
                 sum(losses.values()) / len(losses) if losses else float("nan"), mean,
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
    raw, _ = collect_replies(grid, messages, timeout, len(messages), -1)
    replies = _log_failures(raw, sites, "evaluate", int(config[R.SERVER_ROUND]))
    dice = {}
    for reply in replies:
        site = _site_of(reply, sites)
        metrics = reply.content[R.METRICS]
        dice[site] = float(metrics[R.DICE])
        result.per_site[site] = {
            "dice": float(metrics[R.DICE]),
            "n_test": int(metrics[R.NUM_EXAMPLES]),
            "dice_per_class": [float(v) for v in metrics["dice-per-class"]],
            "hd95": float(metrics.get("hd95", float("nan"))),
            "hd95_per_class": [float(v) for v in metrics.get("hd95-per-class", [])],
        }
    return dice
