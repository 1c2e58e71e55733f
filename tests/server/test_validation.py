"""The update gate (server/validation.py): each bad reply is rejected and named."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord

from server import validation as V
from tests.helpers import make_reply, set_task_identity

FP = "fp-good"
REF = {"w": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32), "steps": np.array(4, np.int64)}


def _reference() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in REF.items()})


def _reply(arrays=None, num_examples=10, node_id=1, site="site-a", fingerprint=FP):
    set_task_identity()
    reply = make_reply(dict(REF if arrays is None else arrays), num_examples, node_id, site)
    if fingerprint is not None:
        reply.content["config"]["fingerprint"] = fingerprint
    return reply


def _with(**changes):
    arrays = dict(REF)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


# (case name, reply kwargs, substring the reason must contain)
ILL_CASES = [
    ("nan", dict(arrays=_with(w=np.full((2, 2), np.nan, np.float32))), "w: 4 NaN"),
    ("inf", dict(arrays=_with(b=np.array([0, np.inf, 0], np.float32))), "b: 0 NaN and 1 Inf"),
    ("wrong shape", dict(arrays=_with(w=np.ones((3, 3), np.float32))), "w: shape (3, 3)"),
    ("broadcastable shape", dict(arrays=_with(w=np.ones((1,), np.float32))), "w: shape (1,), the shared model has (2, 2)"),
    ("missing key", dict(arrays=_with(b=None)), "missing ['b']"),
    ("extra key", dict(arrays=_with(extra=np.ones(1, np.float32))), "unexpected ['extra']"),
    ("wrong dtype", dict(arrays=_with(w=np.ones((2, 2), np.float64))), "w: dtype float64"),
    ("int buffer as float", dict(arrays=_with(steps=np.array(4.0, np.float32))), "steps: dtype float32"),
    ("wrong fingerprint", dict(fingerprint="fp-other"), "fingerprint 'fp-other' differs"),
    ("no fingerprint", dict(fingerprint=None), "no architecture fingerprint"),
    ("1e9 examples", dict(num_examples=10**9), "implausible num-examples 1000000000"),
    ("negative examples", dict(num_examples=-10), "num-examples is -10, must be positive"),
    ("zero examples", dict(num_examples=0), "must be positive"),
    ("fractional examples", dict(num_examples=2.5), "not an integer"),
]


@pytest.mark.parametrize("name,kwargs,expected", ILL_CASES, ids=[c[0] for c in ILL_CASES])
def test_each_bad_reply_is_rejected_with_a_named_reason(name, kwargs, expected):
    # Prepare
    reply = _reply(**kwargs)
    # Execute
    reason = V.validate_reply(reply, _reference(), FP, max_examples=40)
    # Assert
    assert reason is not None and expected in reason, (name, reason)


def test_good_reply_passes():
    assert V.validate_reply(_reply(), _reference(), FP, max_examples=40) is None


def test_missing_num_examples_is_rejected():
    reply = _reply()
    reply.content["metrics"] = MetricRecord({"loss": 0.1})
    assert "no 'num-examples'" in V.validate_reply(reply, _reference(), FP, 40)


def test_two_array_records_are_rejected_before_a_strategy_could_raise():
    reply = _reply()
    reply.content["more"] = ArrayRecord({"w": Array(np.ones((2, 2), np.float32))})
    assert "expected one ArrayRecord" in V.validate_reply(reply, _reference(), FP, 40)


def test_gate_names_sites_and_keeps_the_good_replies():
    # Prepare
    good = [_reply(node_id=n, site=f"site-{n}") for n in (1, 2)]
    bad = _reply(arrays=_with(w=np.full((2, 2), np.nan, np.float32)), node_id=3, site="site-3")
    liar = _reply(num_examples=10**9, node_id=4, site="site-4")
    sites = {1: "site-1", 2: "site-2", 3: "site-3", 4: "site-4"}
    # Execute
    accepted, rejected = V.gate(good + [bad, liar], _reference(), FP, {n: 40 for n in sites}, lambda r: sites[r.metadata.src_node_id])
    # Assert
    assert [r.metadata.src_node_id for r in accepted] == [1, 2]
    assert [(r.site, r.node_id) for r in rejected] == [("site-3", 3), ("site-4", 4)]
    assert "NaN" in rejected[0].reason and "implausible" in rejected[1].reason


def test_num_examples_limit_is_the_enrolled_training_set():
    assert V.check_num_examples(40, 40) is None
    assert "implausible" in V.check_num_examples(41, 40)
    assert V.check_num_examples(10**9, None) is None  # no enrolment known: only positivity


def test_check_aggregate_flags_a_non_finite_global():
    assert V.check_aggregate(ArrayRecord({"w": Array(np.array([np.nan], np.float32))})) is not None
    assert V.check_aggregate(_reference()) is None
