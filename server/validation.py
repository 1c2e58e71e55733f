"""The update gate: checks a train reply must pass before any strategy sees it.

Stock flwr 1.42 strategies only check that replies share a key set and carry a
scalar weight (``strategy_utils.validate_message_reply_consistency``); measured
on 1.42, FedAvg lets NaN into the global model, silently broadcasts a (1,)
update into a (2, 2) tensor, ends the whole run on a wrong key set and lets a
site claiming 1e9 examples dominate the average, and nothing bounds a reply's
size or the length of an update (a site sending 100x its update moves FedAvg
wherever it likes). Each check here is a pure function returning ``None``
(pass) or a reason naming the offending key or value, so it can be unit-tested
without messages; :func:`gate` applies them to a round's replies, then bounds
each update's norm by the round's median, and returns the accepted replies and
the rejections.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from shared_models import protocol as R


@dataclass(frozen=True)
class GateLimits:
    """The gate's bounds (0 switches one off).

    ``payload_ratio``: a reply's array bytes may be at most this multiple of the
    shared model's. ``norm_bound``: an update ``reply - global`` whose L2 norm
    exceeds this multiple of the round's median update norm is refused.
    """

    payload_ratio: float = 1.5
    norm_bound: float = 10.0


@dataclass(frozen=True)
class Rejection:
    """One reply the gate refused: which site, which node, why."""

    site: str
    node_id: int
    reason: str


def check_structure(content: Mapping[str, Any]) -> str | None:
    """Exactly one ArrayRecord (``arrays``) and one MetricRecord (``metrics``)."""
    arrays = [k for k, v in content.items() if isinstance(v, ArrayRecord)]
    metrics = [k for k, v in content.items() if isinstance(v, MetricRecord)]
    if arrays != [R.ARRAYS]:
        return f"expected one ArrayRecord {R.ARRAYS!r}, got {sorted(arrays)}"
    if metrics != [R.METRICS]:
        return f"expected one MetricRecord {R.METRICS!r}, got {sorted(metrics)}"
    return None


def check_payload(arrays: ArrayRecord, reference: ArrayRecord, ratio: float) -> str | None:
    """Counted on the received bytes, before any array is decoded into numpy data."""
    if ratio <= 0:
        return None
    size, model = arrays.count_bytes(), reference.count_bytes()
    if size > ratio * model:
        return f"payload of {size} bytes exceeds {ratio:g} x the shared model's {model} bytes"
    return None


def check_fingerprint(claimed: Any, expected: str) -> str | None:
    """The architecture fingerprint the site built must be the server's."""
    if claimed is None:
        return "no architecture fingerprint in the reply"
    if claimed != expected:
        return f"architecture fingerprint {claimed!r} differs from the server's {expected!r}"
    return None


def check_keys(arrays: Mapping[str, Array], reference: Mapping[str, Array]) -> str | None:
    """The reply carries exactly the global model's shared keys."""
    missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"key set differs from the shared model (missing {missing[:3]}, unexpected {extra[:3]})"
    return None


def check_dtypes(arrays: Mapping[str, Array], reference: Mapping[str, Array]) -> str | None:
    """Each array has the dtype of the global array of the same key."""
    for key, ref in reference.items():
        if key in arrays and arrays[key].dtype != ref.dtype:
            return f"{key}: dtype {arrays[key].dtype}, the shared model has {ref.dtype}"
    return None


def check_shapes(arrays: Mapping[str, Array], reference: Mapping[str, Array]) -> str | None:
    """Exact shape equality: a broadcastable shape such as (1,) for (2, 2) is refused."""
    for key, ref in reference.items():
        if key in arrays and tuple(arrays[key].shape) != tuple(ref.shape):
            return f"{key}: shape {tuple(arrays[key].shape)}, the shared model has {tuple(ref.shape)}"
    return None


def check_encoding(arrays: Mapping[str, Array]) -> str | None:
    """Each array decodes without pickle into exactly the dtype and shape it declares.

    The declared metadata is what :func:`check_shapes` saw; a payload of another
    shape would otherwise reach the strategy (and broadcast), and one that does
    not decode (a pickled object array) would end the round in the strategy.
    """
    for key, array in arrays.items():
        try:
            values = array.numpy()
        except Exception as exc:  # np.load(allow_pickle=False) refuses object arrays; torn bytes raise too
            return f"{key}: not a plain numpy array ({exc.__class__.__name__})"
        if str(values.dtype) != array.dtype or tuple(values.shape) != tuple(array.shape):
            return f"{key}: holds {values.dtype} {tuple(values.shape)}, declares {array.dtype} {tuple(array.shape)}"
    return None


def check_finite(arrays: Mapping[str, Array]) -> str | None:
    """No NaN or +-Inf in any floating-point array."""
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            n_nan, n_inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
            return f"{key}: {n_nan} NaN and {n_inf} Inf values"
    return None


def check_num_examples(value: Any, limit: int | None) -> str | None:
    """A positive integer no larger than the site's enrolled training set (``limit``)."""
    if value is None:
        return f"no {R.NUM_EXAMPLES!r} in the reply metrics"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{R.NUM_EXAMPLES} is {value!r}, not a number"
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        return f"{R.NUM_EXAMPLES} is {value!r}, not an integer"
    if value <= 0:
        return f"{R.NUM_EXAMPLES} is {int(value)}, must be positive"
    if limit is not None and value > limit:
        return f"implausible {R.NUM_EXAMPLES} {int(value)}: the site enrolled with {limit} training cases"
    return None


def update_norm(arrays: Mapping[str, Array], reference: Mapping[str, Array]) -> float:
    """L2 norm of ``arrays - reference`` over the floating-point keys (float64 sums)."""
    total = 0.0
    for key, ref in reference.items():
        old = ref.numpy()
        if np.issubdtype(old.dtype, np.inexact):
            total += float(np.square(arrays[key].numpy().astype(np.float64) - old.astype(np.float64)).sum())
    return math.sqrt(total)


def check_norm_bounds(norms: Mapping[int, float], factor: float) -> dict[int, str]:
    """The updates longer than ``factor`` x the median update norm, with their reasons.

    Needs 3 updates or more: the median of two cannot tell the honest one. A
    median of 0 (no site moved) bounds nothing.
    """
    if factor <= 0 or len(norms) < 3:
        return {}
    median = float(np.median(list(norms.values())))
    if median <= 0:
        return {}
    return {i: f"update norm {n:.4g} exceeds {factor:g} x the round's median update norm {median:.4g}"
            for i, n in norms.items() if n > factor * median}


def validate_reply(
    reply: Message, reference: ArrayRecord, fingerprint: str, max_examples: int | None, payload_ratio: float = GateLimits.payload_ratio
) -> str | None:
    """First failing check of one train reply (size and metadata before any array is decoded), or None."""
    content = reply.content
    reason = check_structure(content)
    if reason:
        return reason
    config = content.get(R.CONFIG)
    claimed = config.get(R.FINGERPRINT) if isinstance(config, ConfigRecord) else None
    arrays = content[R.ARRAYS]
    return (
        check_payload(arrays, reference, payload_ratio)
        or check_fingerprint(claimed, fingerprint)
        or check_keys(arrays, reference)
        or check_dtypes(arrays, reference)
        or check_shapes(arrays, reference)
        or check_num_examples(content[R.METRICS].get(R.NUM_EXAMPLES), max_examples)
        or check_encoding(arrays)
        or check_finite(arrays)
    )


def gate(
    replies: Iterable[Message],
    reference: ArrayRecord,
    fingerprint: str,
    max_examples: Mapping[int, int],
    site_of: Callable[[Message], str],
    limits: GateLimits = GateLimits(),
) -> tuple[list[Message], list[Rejection]]:
    """Split a round's (non-error) train replies into accepted and rejected.

    Each reply is checked on its own, then the well-formed ones against each
    other: an update far longer than the round's median is refused.
    """
    accepted, rejected = [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        reason = validate_reply(reply, reference, fingerprint, max_examples.get(node), limits.payload_ratio)
        if reason is None:
            accepted.append(reply)
        else:
            rejected.append(Rejection(site_of(reply), node, reason))
    if limits.norm_bound > 0 and len(accepted) >= 3:
        norms = {i: update_norm(r.content[R.ARRAYS], reference) for i, r in enumerate(accepted)}
        outliers = check_norm_bounds(norms, limits.norm_bound)
        rejected += [Rejection(site_of(accepted[i]), accepted[i].metadata.src_node_id, why) for i, why in outliers.items()]
        accepted = [r for i, r in enumerate(accepted) if i not in outliers]
    return accepted, rejected


def check_aggregate(arrays: ArrayRecord) -> str | None:
    """The new global model must be finite (the last line of defence)."""
    return check_finite(arrays)
