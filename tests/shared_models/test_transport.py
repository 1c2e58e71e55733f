"""shared_models.transport: floating arrays narrowed on the wire, integers untouched, upcast exactly."""

import numpy as np
import pytest
import torch

from shared_models.transport import TRANSPORT_DTYPES, decode, encode, from_bf16_bits, payload_bytes, to_bf16_bits, wire_dtype

REFERENCE = {"w": np.dtype(np.float32), "n": np.dtype(np.int64)}


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(3, 5)).astype(np.float32), "n": np.array(7, np.int64)}


def test_bf16_bits_round_to_nearest_even_as_torch():
    special = np.array([0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, -3.4e38, np.inf, -np.inf, 1e-40], np.float32)
    values = np.concatenate([special, np.random.default_rng(0).normal(scale=100, size=1000).astype(np.float32)])
    ours = from_bf16_bits(to_bf16_bits(values))
    theirs = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert np.isnan(from_bf16_bits(to_bf16_bits(np.array([np.nan], np.float32))))[0]
    assert to_bf16_bits(np.array(1.5, np.float32)).shape == ()  # 0-d stays 0-d


@pytest.mark.parametrize("transport", ["fp16", "bf16"])
def test_floats_narrow_integers_travel_as_they_are(transport):
    wire = encode(_arrays(), transport)
    assert wire["w"].dtype == wire_dtype(transport) and wire["w"].shape == (3, 5)
    assert wire["n"].dtype == np.int64 and int(wire["n"]) == 7
    back = decode(wire, REFERENCE, transport)
    assert back["w"].dtype == np.float32 and back["n"].dtype == np.int64
    rounded = torch.from_numpy(_arrays()["w"]).to(torch.float16 if transport == "fp16" else torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(back["w"], rounded)
    assert not np.array_equal(back["w"], _arrays()["w"])  # the wire really is narrower


def test_fp32_is_the_identity_and_unknown_dtypes_are_refused():
    arrays = _arrays()
    assert all(encode(arrays, "fp32")[k] is v for k, v in arrays.items())
    assert all(decode(arrays, REFERENCE, "fp32")[k] is v for k, v in arrays.items())
    with pytest.raises(ValueError, match="transport dtype: expected one of"):
        encode(arrays, "fp8")
    assert TRANSPORT_DTYPES == ("fp32", "fp16", "bf16")


def test_decode_leaves_what_did_not_arrive_in_the_wire_dtype():
    # A float32 array under fp16, or an fp16 array for an integer key, is left for the receiver's dtype check.
    arrays = {"w": np.ones(3, np.float32), "n": np.ones(2, np.float16)}
    back = decode(arrays, REFERENCE, "fp16")
    assert back["w"].dtype == np.float32 and back["n"].dtype == np.float16


def test_payload_bytes_count_tensor_data_only():
    assert payload_bytes({"w": ("float16", (3, 5)), "n": ("int64", ()), "b": ("float32", (4,))}) == 30 + 8 + 16
