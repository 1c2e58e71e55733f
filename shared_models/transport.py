"""The dtype the shared tensors travel in: fp32 (as trained), fp16 or bf16 (half the bytes).

Only floating arrays are cast; integer arrays (e.g. BatchNorm's ``num_batches_tracked``)
travel as they are. The receiver upcasts back to the dtype of its own model, so the
server aggregates in fp32 and every site trains in fp32: only the wire is narrower.
NumPy has no bfloat16, so bf16 travels as its 16-bit pattern (``uint16``, the upper
half of the fp32 word, rounded to nearest even), which no floating tensor of a model has.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

TRANSPORT_DTYPES = ("fp32", "fp16", "bf16")
_WIRE = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16)}


def wire_dtype(transport: str) -> np.dtype:
    """The NumPy dtype a floating array has on the wire under ``transport``."""
    if transport not in _WIRE:
        raise ValueError(f"transport dtype: expected one of {list(TRANSPORT_DTYPES)}, got {transport!r}")
    return _WIRE[transport]


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, round to nearest even (as ``torch.bfloat16``); NaN stays NaN."""
    bits = np.array(values, dtype=np.float32, order="C").view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> fp32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode(arrays: Mapping[str, np.ndarray], transport: str) -> dict[str, np.ndarray]:
    """The arrays as they travel: floating ones in the transport dtype, the rest unchanged."""
    wire = wire_dtype(transport)
    if transport == "fp32":
        return dict(arrays)
    out = {}
    for key, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating):
            out[key] = value
        elif transport == "bf16":
            out[key] = to_bf16_bits(value)
        else:
            out[key] = np.asarray(value).astype(wire)
    return out


def decode(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.dtype], transport: str) -> dict[str, np.ndarray]:
    """Received arrays back in ``reference``'s dtypes: only floating keys that arrived in the wire dtype.

    Anything else is left as it came, for the receiver's own dtype check to judge.
    """
    wire = wire_dtype(transport)
    if transport == "fp32":
        return dict(arrays)
    out = {}
    for key, value in arrays.items():
        target = reference.get(key)
        if target is None or not np.issubdtype(target, np.floating) or value.dtype != wire:
            out[key] = value
        elif transport == "bf16":
            out[key] = from_bf16_bits(value).astype(target)
        else:
            out[key] = value.astype(target)
    return out


def payload_bytes(arrays: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    """Bytes of the tensor data of arrays given as ``{key: (dtype, shape)}`` (no keys, no headers)."""
    return sum(np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64)) for dtype, shape in arrays.values())
