"""The federation's round loop: discover sites, train, aggregate, evaluate, checkpoint.

It follows Flower's ``Strategy.start`` (configure_train -> send_and_receive ->
aggregate_train -> evaluate), with what a long-running hospital federation
needs on top: a bounded wait for sites and a roster of them (:mod:`.sites`),
an update gate (:mod:`.validation`), per-site evaluation of the personalised
models, a checkpoint after every round and resumption at the round after the
last one (:mod:`.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared_models import architecture_fingerprint, build_model, partition
from shared_models import protocol as P
from shared_models.partition import Policy, Split
from shared_models.protocol import EvalMetrics, RoundConfig

from . import metrics as M
from .checkpoint import CheckpointStore, ServerCheckpoint, arrays_to_tensors, resume, strategy_state, tensors_to_arrays
from .run_config import ServerRunConfig
from .sites import FederationError, Roster, collect_replies, messages_to, online_targets, wait_for_nodes
from .strategy import TargetedGrid, aggregate_shared, make_strategy
from .transport import narrowed, tensor_bytes, upcast_replies
from .validation import GateLimits, check_aggregate, gate

log = logging.getLogger("fedsite.server")
TRAFFIC = ("bytes_sent", "bytes_received", "tensor_bytes_sent", "tensor_bytes_received")  # per-round entries and totals
__all__ = ["FederationError", "FederationResult", "run_federation", "train_round", "evaluate_sites"]


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
    bytes_sent: int = 0  # serialised ArrayRecords (tensor data, keys and array headers)
    bytes_received: int = 0
    tensor_bytes_sent: int = 0  # tensor data only, in the transport dtype
    tensor_bytes_received: int = 0
    wall_s: float = 0.0
    start_s: float = 0.0  # waiting for the sites, asking them who they are, resuming
    resumed_from: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the run config, to rebuild any site's model later
    left_out: dict[str, str] = field(default_factory=dict)  # node -> why it could not join at the start
    rejected_cases: dict[str, int] = field(default_factory=dict)  # site -> cases it refused to read

    @property
    def mean_dice(self) -> float:
        values = [v["dice"] for v in self.per_site.values() if math.isfinite(v["dice"])]
        return sum(values) / len(values) if values else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "mean_dice": self.mean_dice}

    def continue_from(self, ckpt: ServerCheckpoint) -> None:
        """Take the history and byte counts of the rounds a checkpoint already holds."""
        self.history = list(ckpt.history)
        self.resumed_from = ckpt.round + 1
        for counter in TRAFFIC:
            setattr(self, counter, sum(int(e.get(counter, 0)) for e in self.history))


@dataclass
class Federation:
    """What the round loop carries from round to round."""

    cfg: ServerRunConfig
    policy: Policy
    split: Split
    fingerprint: str
    base: RoundConfig
    roster: Roster
    strategy: Strategy
    result: FederationResult
    checkpoints: CheckpointStore
    global_arrays: ArrayRecord
    parameter_keys: frozenset[str] | None = None  # trainable parameters among the shared keys (None: all keys to the strategy)
    first_round: int = 1
    fingerprints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, grid: Grid, cfg: ServerRunConfig) -> Federation:
        """Build the global model, wait for the sites, and resume after the last checkpoint if any."""
        policy = Policy.parse(cfg.policy, json.loads(cfg.policy_overrides))
        model = build_model(cfg.model_spec, seed=cfg.seed)
        fingerprint = architecture_fingerprint(model)
        split = partition(model, policy)
        state = model.state_dict()
        base = cfg.round_config(fingerprint)
        nodes = wait_for_sites(grid, cfg)
        roster = Roster.discover(grid, nodes, base.to_record(), cfg.round_timeout, cfg.pooled, cfg.registered_sites)
        log.info("sites: %s", roster.describe())
        log.info("policy %s: %d shared, %d site-local tensors; strategy %s", policy.name, len(split.shared), len(split.local), cfg.strategy)
        strategy = make_strategy(cfg.strategy, len(roster.train_nodes), json.loads(cfg.strategy_options))
        result = FederationResult(cfg.run_name, policy.name, cfg.strategy, cfg.num_rounds, roster.sites, config=cfg.to_run_config(),
                                  left_out={f"node-{n}": r for n, r in roster.excluded.items()},
                                  rejected_cases={i.site_id: i.n_rejected for i in roster.info.values() if i.n_rejected})
        fed = cls(cfg, policy, split, fingerprint, base, roster, strategy, result, CheckpointStore(Path(cfg.out_dir) / "checkpoints", keep=cfg.checkpoint_keep),
                  ArrayRecord({k: state[k] for k in split.shared}), frozenset(n for n, p in model.named_parameters() if p.requires_grad),
                  fingerprints={json.dumps(cfg.model_spec, sort_keys=True): fingerprint})
        ckpt = resume(fed.checkpoints, strategy, run_name=cfg.run_name, fingerprint=fingerprint, policy=policy.name) if cfg.resume else None
        if ckpt is not None:
            fed.global_arrays, fed.first_round = tensors_to_arrays(ckpt.arrays), ckpt.round + 1
            result.continue_from(ckpt)
        return fed

    def round_config(self, rnd: int) -> RoundConfig:
        """The round's configuration: the model spec scheduled for ``rnd`` and its fingerprint."""
        spec = self.cfg.model_spec_at(rnd)
        return dataclasses.replace(self.base, server_round=rnd, model_spec=spec,
                                   fingerprint=scheduled_fingerprint(spec, self.split, self.policy, self.fingerprints))

    def end_round(self, entry: dict[str, Any]) -> None:
        """Record the round, checkpoint it, publish the status and log one line."""
        rnd, result = entry["round"], self.result
        result.history.append(entry)
        self.checkpoints.save(ServerCheckpoint(rnd, self.cfg.run_name, self.fingerprint, self.policy.name,
                                               arrays_to_tensors(self.global_arrays), strategy_state(self.strategy), result.history))
        M.write_status(Path(self.cfg.out_dir), M.round_status(result.to_json(), entry, self.cfg.num_rounds))
        dice, losses = entry.get("dice", {}), entry["train_loss"]
        log.info("round %d/%d: %d site(s), train loss %.4f, mean Dice %.4f %s", rnd, self.cfg.num_rounds, len(losses),
                 _mean(losses.values()), _mean(dice.values()), " ".join(f"{s}={d:.3f}" for s, d in sorted(dice.items())))


SIMULATED_NODES_WAIT_S = 30.0  # virtual SuperNodes exist from the start: waiting longer finds no more


def wait_for_sites(grid: Grid, cfg: ServerRunConfig) -> list[int]:
    """The nodes to federate. With ``sites=`` (simulated nodes) there must be one per site (and the pooled node)."""
    expected = cfg.min_nodes or (len(cfg.site_list) + (1 if cfg.pooled else 0)) or 1
    if not cfg.site_list:
        return wait_for_nodes(grid, expected, cfg.wait_seconds, minimum=min(expected, max(1, cfg.min_train_nodes)))
    try:
        return wait_for_nodes(grid, expected, min(cfg.wait_seconds, SIMULATED_NODES_WAIT_S))
    except FederationError as exc:
        raise FederationError(
            f"sites= names {len(cfg.site_list)} site(s) ({cfg.sites}){' and a pooled node' if cfg.pooled else ''}, "
            f"but {exc}; with `flwr run`, give the simulation that many: "
            f"`flwr federation simulation-config --num-supernodes {expected}`, then `flwr run` again") from exc


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


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
    fed = Federation.start(grid, cfg)
    fed.result.start_s = time.perf_counter() - started
    for rnd in range(fed.first_round, cfg.num_rounds + 1):
        round_cfg = fed.round_config(rnd)
        if not cfg.pooled:
            fed.roster.admit_new_nodes(grid, fed.base.to_record(), cfg.round_timeout)
            fed.result.sites = fed.roster.sites
        before = {c: getattr(fed.result, c) for c in TRAFFIC}
        entry = train_round(grid, fed, round_cfg)
        if rnd % cfg.eval_every == 0 or rnd == cfg.num_rounds:
            final = rnd == cfg.num_rounds
            eval_cfg = dataclasses.replace(round_cfg, with_hd95=final, finetune_epochs=cfg.finetune_epochs if final else 0)
            t_eval = time.perf_counter()
            entry["dice"] = evaluate_sites(grid, fed, eval_cfg)
            entry["evaluate_s"] = time.perf_counter() - t_eval
        entry.update({c: getattr(fed.result, c) - before[c] for c in TRAFFIC})
        fed.end_round(entry)
    result = fed.result
    if result.history and "dice" in result.history[-1] and not result.per_site:
        # Resumed after the final round: the per-site table is the last evaluation.
        result.per_site = {s: {"dice": d} for s, d in result.history[-1]["dice"].items()}
    result.wall_s = time.perf_counter() - started
    return result


def train_round(grid: Grid, fed: Federation, round_cfg: RoundConfig) -> dict[str, Any]:
    """One training round: send the global shared tensors, gate the replies, aggregate; the round's history entry."""
    cfg, roster, result, rnd = fed.cfg, fed.roster, fed.result, round_cfg.server_round
    quorum = min(max(1, cfg.min_train_nodes), len(roster.train_nodes))
    targets = online_targets(grid, roster.train_nodes, quorum, cfg.wait_seconds)
    t_round = time.perf_counter()
    # Flower's sampler waits without bound for min_available_nodes: ask for exactly the targets.
    fed.strategy.min_train_nodes = fed.strategy.min_available_nodes = len(targets)
    messages = list(fed.strategy.configure_train(rnd, fed.global_arrays, ConfigRecord(round_cfg.to_record()), TargetedGrid(grid, targets)))
    outgoing = narrowed(fed.global_arrays, round_cfg.transport_dtype)
    for message in messages:  # the strategy keeps the fp32 model it was given (FedProx, FedOpt); only the wire narrows
        message.content[P.ARRAYS] = outgoing
    count_sent(result, outgoing, len(messages))
    raw, missing = collect_replies(grid, messages, cfg.round_timeout, quorum, cfg.straggler_grace)
    # Replies arrive in completion order; a fixed (site) order makes the float sums of
    # the aggregation, and so the whole federation, reproducible run to run.
    replies = sorted(roster.successful(raw, "train", rnd), key=roster.site_of_reply)
    received = [r.content[P.ARRAYS] for r in replies if isinstance(r.content.get(P.ARRAYS), ArrayRecord)]
    result.bytes_received += sum(a.count_bytes() for a in received)
    result.tensor_bytes_received += sum(tensor_bytes(a) for a in received)
    limits = GateLimits(payload_ratio=cfg.payload_limit, norm_bound=cfg.update_norm_bound)
    upcast_replies(replies, fed.global_arrays, round_cfg.transport_dtype, limits.payload_ratio)
    # Update validation: nothing malformed, oversized, non-finite, implausible or far too long reaches a strategy.
    replies, rejections = gate(replies, fed.global_arrays, round_cfg.fingerprint, roster.max_examples, roster.site_of_reply, limits)
    for rej in rejections:
        log.warning("round %d: rejected the update of site %s: %s", rnd, rej.site, rej.reason)
    entry: dict[str, Any] = {
        "round": rnd,
        "train_sites": sorted(roster.site_of_reply(r) for r in replies),
        "train_loss": {roster.site_of_reply(r): float(r.content[P.METRICS].get(P.LOSS, float("nan"))) for r in replies},
        # the sites' own training loops, without messaging and state I/O (the round profile of `fedsite bench`)
        "site_train_s": {roster.site_of_reply(r): float(r.content[P.METRICS].get(P.TRAIN_SECONDS, 0.0)) for r in replies},
        "site_app_s": {roster.site_of_reply(r): float(r.content[P.METRICS].get(P.APP_SECONDS, 0.0)) for r in replies},
        "rejected": {rej.site: rej.reason for rej in rejections},
        "failed": sorted(roster.site_of_reply(r) for r in raw if r.has_error()),
        "no_reply": sorted(roster.site_of(n) for n in missing),
        "offline": sorted(roster.site_of(n) for n in roster.train_nodes if n not in targets),
    }
    t_agg = time.perf_counter()
    skipped = aggregate(fed, rnd, replies, quorum)
    if skipped:
        entry["skipped"] = skipped
    entry["aggregate_s"] = time.perf_counter() - t_agg
    entry["train_s"] = t_agg - t_round
    return entry


def aggregate(fed: Federation, rnd: int, replies: list[Message], quorum: int) -> str | None:
    """Replace the global shared tensors by the aggregate of ``replies``; why not, if it did not."""
    if len(replies) < quorum:
        reason = f"{len(replies)} valid update(s), quorum is {quorum}"
        log.warning("round %d: skipped, global model unchanged (%s)", rnd, reason)
        return reason
    try:
        aggregated, _ = aggregate_shared(fed.strategy, rnd, replies, fed.global_arrays, fed.parameter_keys)
    except Exception as exc:  # a strategy error must not end a long federation
        reason = f"aggregation failed: {exc.__class__.__name__}: {exc}"
        log.error("round %d: %s; global model unchanged", rnd, reason)
        return reason
    if aggregated is not None and (bad := check_aggregate(aggregated)):
        reason = f"aggregate not finite ({bad})"
        log.error("round %d: %s; global model unchanged", rnd, reason)
        return reason
    if aggregated is not None:
        fed.global_arrays = aggregated
    return None


def count_sent(result: FederationResult, outgoing: ArrayRecord, n_messages: int) -> None:
    """Add ``n_messages`` copies of ``outgoing`` to what the server sent."""
    result.bytes_sent += outgoing.count_bytes() * n_messages
    result.tensor_bytes_sent += tensor_bytes(outgoing) * n_messages


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


def evaluate_sites(grid: Grid, fed: Federation, round_cfg: RoundConfig) -> dict[str, float]:
    """Each online site scores its personalised model on its own held-out split."""
    online = set(grid.get_node_ids())
    nodes = [n for n in fed.roster.eval_nodes if n in online]
    outgoing = narrowed(fed.global_arrays, round_cfg.transport_dtype)
    record = RecordDict({P.ARRAYS: outgoing, P.CONFIG: ConfigRecord(round_cfg.to_record())})
    messages = messages_to(record, nodes, MessageType.EVALUATE)
    count_sent(fed.result, outgoing, len(messages))
    raw, _ = collect_replies(grid, messages, fed.cfg.round_timeout, len(messages), -1)
    dice = {}
    # Site order, not arrival order: the mean over sites is then the same float every run.
    for reply in sorted(fed.roster.successful(raw, "evaluate", round_cfg.server_round), key=fed.roster.site_of_reply):
        site, metrics = fed.roster.site_of_reply(reply), EvalMetrics.from_record(reply.content[P.METRICS])
        dice[site] = metrics.dice
        fed.result.per_site[site] = metrics.to_json()
    return dice
