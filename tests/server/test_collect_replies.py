"""Bounded reply collection: quorum + straggler grace, dead nodes named, never the default 3600 s."""

import time

from flwr.app import ConfigRecord, Error, Message, RecordDict

from server.sites import collect_replies
from tests.helpers import set_task_identity


class ScriptedGrid:
    """Replies arrive at scripted delays; ``None`` = never; ``"dead"`` = SuperLink error reply."""

    def __init__(self, delays):
        self.delays, self.t0, self.sent = delays, None, {}

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{i}"
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_src_node_id"] = 0
            self.sent[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            msg, delay = self.sent[mid], self.delays[self.sent[mid].metadata.dst_node_id]
            if delay is None:
                continue
            kind, at = ("dead", delay[1]) if isinstance(delay, tuple) else ("ok", delay)
            if time.monotonic() - self.t0 < at:
                continue
            if kind == "dead":
                reply = Message(Error(code=5, reason="node unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1  # Flower's SuperLink answers for the dead node
            else:
                reply = Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)
            out.append(reply)
        return out


def _messages(nodes):
    return [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]


def test_grace_closes_the_round_after_the_quorum_without_the_straggler():
    set_task_identity()
    grid = ScriptedGrid({11: 0.0, 12: 0.0, 13: None})
    t = time.monotonic()
    replies, missing = collect_replies(grid, _messages([11, 12, 13]), timeout=60, quorum=2, grace=0.5, poll=0.05)
    assert time.monotonic() - t < 5
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 12] and missing == [13]


def test_a_dead_node_is_named_by_its_own_id_and_ends_the_wait():
    set_task_identity()
    grid = ScriptedGrid({11: 0.0, 12: ("dead", 0.3)})
    replies, missing = collect_replies(grid, _messages([11, 12]), timeout=60, quorum=1, grace=-1, poll=0.05)
    errors = [r for r in replies if r.has_error()]
    assert missing == [] and [r.metadata.src_node_id for r in errors] == [12]


def test_timeout_bounds_the_wait_when_the_quorum_never_comes():
    set_task_identity()
    grid = ScriptedGrid({11: 0.0, 12: None})
    t = time.monotonic()
    replies, missing = collect_replies(grid, _messages([11, 12]), timeout=0.5, quorum=2, grace=0, poll=0.05)
    assert time.monotonic() - t < 3 and len(replies) == 1 and missing == [12]
