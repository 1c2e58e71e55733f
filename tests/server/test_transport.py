"""The server's side of the transport dtype: narrowed updates upcast before the gate, aggregated in fp32."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from server.strategy import aggregate_shared, make_strategy
from server.transport import narrowed, tensor_bytes, upcast_replies
from server.validation import validate_reply
from shared_models.transport import encode
from tests.helpers import make_reply, set_task_identity

REFERENCE = ArrayRecord({"conv.weight": Array(np.zeros((4, 3), np.float32)), "norm.num_batches_tracked": Array(np.array(0, np.int64))})


def _update(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": (scale * rng.normal(size=(4, 3))).astype(np.float32), "norm.num_batches_tracked": np.array(3 + seed, np.int64)}


def _reply(arrays, num_examples, node, transport):
    reply = make_reply(encode(arrays, transport), num_examples, node, site=f"site-{node}")
    reply.content["config"] = ConfigRecord({"site-id": f"site-{node}", "fingerprint": "fp"})
    return reply


@pytest.mark.parametrize("transport,narrow", [("fp16", np.float16)])
def test_the_aggregate_is_the_fp32_mean_of_the_rounded_updates(transport, narrow):
    set_task_identity()
    updates, weights = [_update(1), _update(2), _update(3)], [10, 30, 20]
    replies = [_reply(u, w, i + 1, transport) for i, (u, w) in enumerate(zip(updates, weights))]
    assert replies[0].content["arrays"]["conv.weight"].dtype == "float16"
    upcast_replies(replies, REFERENCE, transport)
    assert all(r.content["arrays"]["conv.weight"].dtype == "float32" for r in replies)
    assert all(validate_reply(r, REFERENCE, "fp", None) is None for r in replies)
    arrays, _ = aggregate_shared(make_strategy("fedavg", 3), 1, replies, REFERENCE)
    rounded = [u["conv.weight"].astype(narrow).astype(np.float32) for u in updates]
    expected = sum(w * r for w, r in zip(weights, rounded)) / sum(weights)
    exact = sum(w * u["conv.weight"] for w, u in zip(weights, updates)) / sum(weights)
    weight = arrays["conv.weight"].numpy()
    assert weight.dtype == np.float32
    np.testing.assert_allclose(weight, expected, rtol=1e-6, atol=0)
    assert np.abs(weight - exact).max() > 1e-5  # the rounding is visible: it is not the fp32 mean of the raw updates
    assert int(arrays["norm.num_batches_tracked"].numpy()) == round((10 * 4 + 30 * 5 + 20 * 6) / 60)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("transport", ["fp16", "bf16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e5])  # 1e5 overflows fp16 to Inf on the cast
def test_a_value_non_finite_after_the_cast_is_refused_by_the_gate(transport, bad):
    set_task_identity()
    update = _update(1)
    update["conv.weight"][2, 1] = bad
    reply = _reply(update, 10, 1, transport)
    upcast_replies([reply], REFERENCE, transport)
    reason = validate_reply(reply, REFERENCE, "fp", None)
    if transport == "bf16" and bad == 1e5:  # within bf16's range: finite, accepted
        assert reason is None
    else:
        assert reason == ("conv.weight: 1 NaN and 0 Inf values" if np.isnan(bad) else "conv.weight: 0 NaN and 1 Inf values")


def test_a_narrowed_update_under_fp32_transport_is_refused():
    set_task_identity()
    reply = _reply(_update(1), 10, 1, "fp16")
    upcast_replies([reply], REFERENCE, "fp32")
    assert validate_reply(reply, REFERENCE, "fp", None) == "conv.weight: dtype float16, the shared model has float32"


def test_the_global_model_travels_narrowed_and_its_tensor_bytes_halve():
    assert narrowed(REFERENCE, "fp32") is REFERENCE
    half = narrowed(REFERENCE, "fp16")
    assert half["conv.weight"].dtype == "float16" and half["norm.num_batches_tracked"].dtype == "int64"
    assert tensor_bytes(REFERENCE) == 12 * 4 + 8 and tensor_bytes(half) == 12 * 2 + 8
    assert half.count_bytes() < REFERENCE.count_bytes()
