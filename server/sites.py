"""Which Flower node is which site: discovery, targeting, reply collection and the roster.

Flower knows nodes by number; a federation knows hospitals by name. This module
keeps the map between them (a site that reconnects comes back under a new node
id), waits for nodes with a bound (Flower's own sampler waits forever), and
pushes messages and pulls replies with a timeout, a quorum and a straggler grace.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from shared_models import protocol as P
from shared_models.protocol import SiteInfo

log = logging.getLogger("fedsite.server")


class FederationError(RuntimeError):
    """The federation cannot proceed (sites missing, every site failed...)."""


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


FIRST_POLL_S = 0.02  # the first wait between pulls; it doubles up to ``poll``


def collect_replies(
    grid: Grid, messages: list[Message], timeout: float, quorum: int, grace: float, poll: float = 0.1
) -> tuple[list[Message], list[int]]:
    """Push ``messages`` and pull replies until all arrived, or ``grace`` seconds after
    ``quorum`` successful replies (``grace`` < 0: no early close), or ``timeout``.

    A node that dies mid-round comes back as an error reply (Flower's
    NODE_UNAVAILABLE, after 2 missed heartbeats) whose source is the SuperLink,
    so every reply's ``src_node_id`` is set to the node the message went to.
    Returns the replies and the nodes that sent none. The wait between pulls starts
    short and doubles up to ``poll`` (again short after each reply), so a fast round
    is not rounded up to the next ``poll``.
    """
    targets = [m.metadata.dst_node_id for m in messages]
    ids = list(grid.push_messages(messages))
    origin = {mid: node for mid, node in zip(ids, targets) if mid}
    pending = set(origin)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    quorum_at, wait = None, min(FIRST_POLL_S, poll)
    while pending:
        pulled = list(grid.pull_messages(list(pending)))
        wait = min(FIRST_POLL_S, poll) if pulled else min(wait * 2, poll)
        for reply in pulled:
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
        time.sleep(wait)
    return replies, sorted({origin[m] for m in pending} | {n for n, mid in zip(targets, ids) if not mid})


def messages_to(record: RecordDict, node_ids: Iterable[int], message_type: str) -> list[Message]:
    """One message of ``message_type`` carrying ``record`` per node."""
    return [Message(content=record, dst_node_id=n, message_type=message_type) for n in node_ids]


def ask_sites(grid: Grid, nodes: list[int], round_record: dict, timeout: float) -> tuple[dict[int, SiteInfo], dict[int, str]]:
    """Query ``nodes`` for their :class:`SiteInfo`; returns the answers and the errors by node."""
    record = RecordDict({P.CONFIG: ConfigRecord({**round_record, P.SERVER_ROUND: 0})})
    replies, missing = collect_replies(grid, messages_to(record, nodes, MessageType.QUERY), timeout, len(nodes), -1)
    info: dict[int, SiteInfo] = {}
    errors = {n: f"no answer within {timeout:.0f} s" for n in missing}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            errors[node] = reply.error.reason
        else:
            info[node] = SiteInfo.from_record(reply.content[P.CONFIG])
    return info, errors


def refuse_impostors(info: dict[int, SiteInfo], keys: dict[int, str]) -> dict[int, str]:
    """Drop from ``info`` each node whose claimed site id is not the site its key was
    registered under (a site's YAML names it; only the server's key registry proves it).
    ``keys`` empty (simulation): every claim stands. Returns the refused nodes' reasons."""
    if not keys:
        return {}
    refused = {}
    for node in sorted(info):
        claimed, registered = info[node].site_id, keys.get(node)
        if claimed != registered:
            why = f"its key is registered as {registered}" if registered else "its key is not one of the provisioned sites'"
            refused[node] = f"node {node} claims site {claimed} but {why}; refused"
            log.warning("%s", refused[node])
            del info[node]
    return refused


def error_line(reason: str) -> str:
    """The one line of a site's error reply that says what went wrong (its last ``...Error: ...`` line;
    Flower's simulation wraps the ClientApp's exception in an engine traceback)."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    return (named[-1] if named else lines[0] if lines else "no reason given")[:500]


@dataclass
class Roster:
    """The federation's sites: node -> site, who trains, who is scored, who is ignored."""

    info: dict[int, SiteInfo]
    pooled: bool = False
    ignored: set[int] = field(default_factory=set)
    excluded: dict[int, str] = field(default_factory=dict)  # node -> why it was left out at the start
    train_nodes: list[int] = field(default_factory=list)
    eval_nodes: list[int] = field(default_factory=list)
    keys: dict[int, str] = field(default_factory=dict)  # node -> site its key was registered under ({}: trust claims)

    def __post_init__(self) -> None:
        names = [i.site_id for i in self.info.values()]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise FederationError(f"two nodes claim the same site id(s) {sorted(dupes)}")
        self.eval_nodes = sorted((n for n, i in self.info.items() if i.site_id != P.POOLED_SITE), key=self.site_of)
        pooled_nodes = [n for n, i in self.info.items() if i.site_id == P.POOLED_SITE]
        self.train_nodes = pooled_nodes if self.pooled else list(self.eval_nodes)
        if not self.train_nodes:
            raise FederationError("pooled training requested but no pooled node connected" if self.pooled else "no site connected")

    @classmethod
    def discover(cls, grid: Grid, nodes: list[int], round_record: dict, timeout: float, pooled: bool,
                 keys: dict[int, str] | None = None) -> Roster:
        """Ask every node who it is. A node that cannot say (e.g. a site without one valid case), or that
        claims another site than its key's, is left out with its reason logged, and the federation goes
        on with the others; none left is fatal."""
        info, errors = ask_sites(grid, nodes, round_record, timeout)
        for node, reason in sorted(errors.items()):
            log.warning("node %d left out of the federation, it failed to describe its site: %s", node, reason)
        excluded = {n: error_line(e) for n, e in errors.items()} | refuse_impostors(info, keys or {})
        if not info:
            raise FederationError("no site left: " + "; ".join(f"node {n} left out: {e}" for n, e in sorted(excluded.items())))
        return cls(info, pooled, ignored=set(excluded), excluded=excluded, keys=dict(keys or {}))

    def site_of(self, node: int) -> str:
        return self.info[node].site_id if node in self.info else f"node-{node}"

    def site_of_reply(self, reply: Message) -> str:
        return self.site_of(reply.metadata.src_node_id)

    @property
    def sites(self) -> list[str]:
        return [self.site_of(n) for n in self.eval_nodes]

    @property
    def max_examples(self) -> dict[int, int]:
        """The training-set size each node enrolled with (the gate's bound on ``num-examples``)."""
        return {n: i.n_train for n, i in self.info.items()}

    def describe(self) -> str:
        return ", ".join(f"{i.site_id} ({i.n_train} train / {i.n_test} test{f', {i.n_rejected} cases rejected' if i.n_rejected else ''})"
                         for i in sorted(self.info.values(), key=lambda i: i.site_id))

    def admit_new_nodes(self, grid: Grid, round_record: dict, timeout: float) -> None:
        """Identify nodes that connected after the start: a new site, or a known site
        back under a new node id (it takes the old node's place in every list)."""
        online = set(grid.get_node_ids())
        new = sorted(online - set(self.info) - self.ignored)
        if not new:
            return
        info, errors = ask_sites(grid, new, round_record, timeout)
        for node, reason in errors.items():
            log.warning("node %d failed to describe its site, ignored: %s", node, reason)
            self.ignored.add(node)
        self.ignored.update(refuse_impostors(info, self.keys))
        for node, site in sorted(info.items()):
            old = next((n for n, i in self.info.items() if i.site_id == site.site_id), 0)
            if old and old in online:
                log.warning("node %d claims site %s, which node %d (online) already is; ignored", node, site.site_id, old)
                self.ignored.add(node)
                continue
            self._replace(old, node, site)

    def _replace(self, old: int, node: int, site: SiteInfo) -> None:
        self.info[node] = site
        if old:
            del self.info[old]
        for nodes in (self.train_nodes, self.eval_nodes):
            nodes[:] = [node if n == old else n for n in nodes] if old else [*nodes, node]
        log.info("site %s joined as node %d%s", site.site_id, node, f" (was node {old})" if old else "")

    def successful(self, replies: list[Message], phase: str, rnd: int) -> list[Message]:
        """The replies without error; each failure is logged with its site's name."""
        ok = []
        for reply in replies:
            if reply.has_error():
                log.warning("round %d %s: site %s failed: %s", rnd, phase, self.site_of_reply(reply), reply.error.reason)
            else:
                ok.append(reply)
        return ok
