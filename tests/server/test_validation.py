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


# ---------------------------------------------------------------- payload size (T-VAL-18)


def test_an_oversized_reply_is_refused_before_any_array_is_decoded(monkeypatch):
    import tracemalloc

    # Prepare: a 1 MiB shared model; the reply adds 32 MiB of padding arrays
    model = {"w": np.ones((256, 1024), np.float32)}
    reference = ArrayRecord({k: Array(v) for k, v in model.items()})
    padded = {**model, **{f"pad{i}": np.zeros(8 * 2**20, np.uint8) for i in range(4)}}
    set_task_identity()
    reply = make_reply(padded, 10)
    reply.content["config"]["fingerprint"] = FP
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("an array was decoded before the size check"))
    # Execute
    tracemalloc.start()
    reason = V.validate_reply(reply, reference, FP, max_examples=40)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Assert
    assert reason is not None and reason.startswith("payload of ") and "exceeds 1.5 x the shared model's" in reason, reason
    assert peak < 2 * reference.count_bytes()


def test_payload_limit_is_a_multiple_of_the_shared_models_bytes():
    reference = _reference()
    same = ArrayRecord({k: Array(v) for k, v in REF.items()})
    assert V.check_payload(same, reference, 1.5) is None
    bigger = ArrayRecord({**{k: Array(v) for k, v in REF.items()}, "pad": Array(np.zeros(2000, np.uint8))})
    assert "exceeds 1.5 x" in V.check_payload(bigger, reference, 1.5)
    assert V.check_payload(bigger, reference, 0) is None  # off


# ---------------------------------------------------------------- what the bytes hold


def _raw(dtype, shape, payload: np.ndarray, allow_pickle=False) -> Array:
    import io

    buffer = io.BytesIO()
    np.save(buffer, payload, allow_pickle=allow_pickle)
    return Array(dtype, tuple(shape), "numpy.ndarray", buffer.getvalue())


def test_bytes_of_another_shape_than_declared_are_refused_not_broadcast():
    reply = _reply()
    reply.content["arrays"]["w"] = _raw("float32", (2, 2), np.ones((1,), np.float32))
    assert V.validate_reply(reply, _reference(), FP, 40) == "w: holds float32 (1,), declares float32 (2, 2)"


def test_a_pickled_object_array_is_refused_without_running_it(tmp_path):
    # Prepare: an object array whose element runs code when unpickled
    sentinel = tmp_path / "ran"
    payload = np.empty(1, dtype=object)
    payload[0] = _Exploit(sentinel)
    reply = _reply()
    reply.content["arrays"]["w"] = _raw("float32", (2, 2), payload, allow_pickle=True)
    # Execute (the size check off: this payload is larger than the tiny model, decoding is what is tested)
    reason = V.validate_reply(reply, _reference(), FP, 40, payload_ratio=0)
    # Assert
    assert reason == "w: not a plain numpy array (ValueError)"
    assert not sentinel.exists()


class _Exploit:
    """Unpickling this writes ``path``: proof that a loader ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


# ---------------------------------------------------------------- update norm bound (T-VAL-17)

BASE = {"w": np.zeros((4, 4), np.float32), "steps": np.array(4, np.int64)}


def _base_record() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in BASE.items()})


def _update_replies(deltas):
    """One reply per delta (global + delta), nodes 1..n, sites site-1..site-n."""
    set_task_identity()
    replies = []
    for n, delta in enumerate(deltas, start=1):
        reply = make_reply({"w": BASE["w"] + delta, "steps": BASE["steps"] + 3}, 10, n, f"site-{n}")
        reply.content["config"]["fingerprint"] = FP
        replies.append(reply)
    return replies


def _honest(n, seed=0):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(4, 4)).astype(np.float32)
    return [direction + 0.1 * rng.normal(size=(4, 4)).astype(np.float32) for _ in range(n)]


def _gate(replies, limits=V.GateLimits()):
    return V.gate(replies, _base_record(), FP, {}, lambda r: f"site-{r.metadata.src_node_id}", limits)


def test_a_100x_scaled_update_is_rejected_and_named():
    # Prepare: 4 honest sites, site-5 sends 100 x its update
    deltas = _honest(5)
    deltas[4] = 100 * deltas[4]
    # Execute
    accepted, rejected = _gate(_update_replies(deltas))
    # Assert
    assert [r.metadata.src_node_id for r in accepted] == [1, 2, 3, 4]
    assert [(r.site, r.node_id) for r in rejected] == [("site-5", 5)]
    norms = [float(np.linalg.norm(d)) for d in deltas]
    expected = f"update norm {norms[4]:.4g} exceeds 10 x the round's median update norm {np.median(norms):.4g}"
    assert rejected[0].reason == expected


def test_update_norm_is_the_l2_distance_over_floating_keys():
    (reply,) = _update_replies([np.full((4, 4), 0.5, np.float32)])
    assert V.update_norm(reply.content["arrays"], _base_record()) == pytest.approx(2.0)  # the int counter moved too: not counted


def test_honest_spread_and_small_rounds_are_not_bounded():
    assert _gate(_update_replies(_honest(5)))[1] == []
    two = _honest(2)
    two[1] = 100 * two[1]
    assert _gate(_update_replies(two))[1] == []  # the median of two cannot tell the honest one
    assert _gate(_update_replies([np.zeros((4, 4), np.float32)] * 3))[1] == []  # nobody moved
    scaled = _honest(5)
    scaled[0] = 100 * scaled[0]
    assert _gate(_update_replies(scaled), V.GateLimits(norm_bound=0))[1] == []  # off


@pytest.mark.parametrize("strategy", ["fedmedian", "krum"])
def test_a_sign_flipped_update_passes_the_norm_bound_and_robust_strategies_bound_it(strategy):
    from server.strategy import aggregate_shared, make_strategy

    # Prepare: site-5 sends the opposite of an honest update (same norm)
    deltas = _honest(5)
    flipped = deltas[:4] + [-deltas[4]]
    accepted, rejected = _gate(_update_replies(flipped))
    assert rejected == [] and len(accepted) == 5  # the norm bound alone cannot see a sign flip
    honest_mean = np.mean(deltas[:4], axis=0)
    # Execute
    fedavg, _ = aggregate_shared(make_strategy("fedavg", 5), 1, accepted, _base_record())
    robust, _ = aggregate_shared(make_strategy(strategy, 5, {"num_malicious_nodes": 1} if strategy == "krum" else {}), 1, accepted, _base_record())
    # Assert: the robust aggregate stays near the honest one, FedAvg is pulled away
    pulled = np.linalg.norm(fedavg["w"].numpy() - honest_mean)
    assert np.linalg.norm(robust["w"].numpy() - honest_mean) < 0.5 * pulled
