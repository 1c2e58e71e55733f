"""The server's side of the transport dtype: narrow what it sends, upcast what it receives.

The global model stays fp32 at the server and the strategies aggregate fp32
arrays: a site's narrowed update is upcast before the update gate sees it (so the
gate's dtype and finiteness checks judge what will be aggregated: an fp16 overflow
arrives as Inf and is refused), and the global model is narrowed only on its way out.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from shared_models import protocol as P
from shared_models.transport import decode, encode, payload_bytes

from .validation import GateLimits, check_encoding, check_payload


def narrowed(record: ArrayRecord, transport: str) -> ArrayRecord:
    """``record`` as it travels under ``transport`` (the same object for fp32)."""
    if transport == "fp32":
        return record
    return ArrayRecord({k: Array(v) for k, v in encode({k: a.numpy() for k, a in record.items()}, transport).items()})


def upcast_replies(replies: list[Message], reference: ArrayRecord, transport: str, payload_ratio: float = GateLimits.payload_ratio) -> None:
    """Put each reply's narrowed arrays back in the global model's dtypes, in place.

    A reply too large or not plainly decodable is left as it came, undecoded: the
    update gate then refuses it with its own reason (size before any decoding).
    """
    if transport == "fp32":
        return
    dtypes = {k: np.dtype(a.dtype) for k, a in reference.items()}
    for reply in replies:
        arrays = reply.content.get(P.ARRAYS) if not reply.has_error() else None
        if isinstance(arrays, ArrayRecord) and check_payload(arrays, reference, payload_ratio) is None and check_encoding(arrays) is None:
            decoded = decode({k: a.numpy() for k, a in arrays.items()}, dtypes, transport)
            reply.content[P.ARRAYS] = ArrayRecord({k: Array(v) for k, v in decoded.items()})


def tensor_bytes(record: ArrayRecord) -> int:
    """Bytes of the tensor data of ``record`` (what the transport dtype halves; no keys or headers)."""
    return payload_bytes({k: (a.dtype, tuple(a.shape)) for k, a in record.items()})
