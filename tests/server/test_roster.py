"""Roster.discover: a site that cannot describe itself is left out with its reason; its rejected cases are counted."""

import logging

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from server.sites import FederationError, Roster
from shared_models import protocol as P
from shared_models.protocol import SiteInfo
from tests.helpers import set_task_identity


class AnsweringGrid:
    """Each node answers the query with its SiteInfo, or with an error reply (a ClientApp exception)."""

    def __init__(self, answers):
        self.answers, self.sent = answers, {}

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent[f"m{i}"] = msg
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            msg = self.sent[mid]
            answer = self.answers[msg.metadata.dst_node_id]
            if isinstance(answer, SiteInfo):
                reply = Message(RecordDict({P.CONFIG: ConfigRecord(answer.to_record())}), reply_to=msg)
            else:
                reply = Message(Error(code=2, reason=answer), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            out.append(reply)
        return out


def test_a_site_without_a_valid_case_is_left_out_and_the_others_federate(caplog):
    set_task_identity()
    grid = AnsweringGrid({1: SiteInfo("site-a", 30, 10, n_rejected=2), 2: "DataError: site site-b (/data/b): no valid case (3 rejected)",
                          3: SiteInfo("site-c", 20, 5)})
    with caplog.at_level(logging.WARNING):
        roster = Roster.discover(grid, [1, 2, 3], {}, timeout=5, pooled=False)
    assert roster.sites == ["site-a", "site-c"] and roster.train_nodes == [1, 3]
    assert 2 in roster.ignored and "no valid case" in roster.excluded[2]
    assert "site site-b" in caplog.text and "left out" in caplog.text
    assert "2 cases rejected" in roster.describe()


def test_no_site_answering_is_fatal_naming_each_node():
    set_task_identity()
    grid = AnsweringGrid({1: "boom a", 2: "boom b"})
    with pytest.raises(FederationError, match="node 1 .*boom a.*node 2 .*boom b"):
        Roster.discover(grid, [1, 2], {}, timeout=5, pooled=False)


def test_site_info_round_trips_its_rejected_count_and_old_replies_read_as_zero():
    info = SiteInfo("s", 3, 1, n_rejected=4)
    assert SiteInfo.from_record(info.to_record()) == info
    assert SiteInfo.from_record({P.SITE_ID: "s", P.N_TRAIN: 3, P.N_TEST: 1}).n_rejected == 0


def test_a_node_claiming_another_site_than_its_key_is_refused_and_named(caplog):
    # Prepare: node 2 holds site-b's key but claims site-a; node 4's key was never provisioned
    set_task_identity()
    grid = AnsweringGrid({1: SiteInfo("site-a", 30, 10), 2: SiteInfo("site-a", 25, 5), 3: SiteInfo("site-c", 20, 5), 4: SiteInfo("site-d", 9, 3)})
    keys = {1: "site-a", 2: "site-b", 3: "site-c"}
    # Execute
    with caplog.at_level(logging.WARNING):
        roster = Roster.discover(grid, [1, 2, 3, 4], {}, timeout=5, pooled=False, keys=keys)
    # Assert: the honest sites federate, the impostor is excluded with one line naming node, claim and key
    assert roster.sites == ["site-a", "site-c"] and roster.train_nodes == [1, 3]
    assert {2, 4} <= roster.ignored and roster.site_of(1) == "site-a"
    lines = [r.getMessage() for r in caplog.records]
    assert "node 2 claims site site-a but its key is registered as site-b; refused" in lines
    assert "node 4 claims site site-d but its key is not one of the provisioned sites'; refused" in lines
    assert "registered as site-b" in roster.excluded[2]


def test_a_late_impostor_is_ignored_and_without_keys_claims_stand():
    set_task_identity()
    grid = AnsweringGrid({1: SiteInfo("site-a", 30, 10), 2: SiteInfo("site-a", 25, 5)})
    grid.get_node_ids = lambda: [1, 2]
    roster = Roster.discover(grid, [1], {}, timeout=5, pooled=False, keys={1: "site-a", 2: "site-b"})
    # node 2 (site-b's key) connects later claiming site-a, while site-a's node is offline: still refused
    grid.get_node_ids = lambda: [2]
    roster.admit_new_nodes(grid, {}, timeout=5)
    assert 2 in roster.ignored and roster.train_nodes == [1] and roster.site_of(2) == "node-2"
    # simulation (no key map): the same late claim replaces the offline node, as before
    plain = Roster.discover(grid, [1], {}, timeout=5, pooled=False)
    plain.admit_new_nodes(grid, {}, timeout=5)
    assert plain.train_nodes == [2] and plain.site_of(2) == "site-a"
