"""Moving tensors between a site's model and Flower records, shared keys only.

The guard that no site-local tensor leaves the site is here, in code: every
outgoing ArrayRecord passes :func:`ensure_no_local_keys`, whatever the policy.
Shared tensors travel in the round's transport dtype (:mod:`shared_models.transport`)
and are upcast to the model's own dtype on receipt.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from shared_models.partition import Split
from shared_models.transport import decode, encode


class ModelMismatchError(ValueError):
    """The server's arrays do not fit this site's model (keys or shapes)."""


class LocalKeyLeakError(RuntimeError):
    """An outgoing record carried a site-local tensor; the reply is refused."""


def load_shared(model: nn.Module, arrays: ArrayRecord, split: Split, site: str, transport: str = "fp32") -> dict[str, torch.Tensor]:
    """Load the global shared tensors into ``model``; strict on keys and shapes; returns them (narrowed ones upcast)."""
    received = received_tensors(arrays, model.state_dict(), transport)
    expected = set(split.shared)
    if set(received) != expected:
        missing, extra = sorted(expected - set(received)), sorted(set(received) - expected)
        raise ModelMismatchError(f"site {site}: server arrays do not match the shared keys (missing {missing[:3]}, unexpected {extra[:3]})")
    state = model.state_dict()
    for key, value in received.items():
        if value.numel() == 1 and state[key].numel() == 1:
            value = value.reshape(state[key].shape)  # scalars travel as shape (1,)
        if tuple(value.shape) != tuple(state[key].shape):
            raise ModelMismatchError(f"site {site}: {key} has shape {tuple(value.shape)} from the server, the model has {tuple(state[key].shape)}")
        state[key] = value.to(state[key].dtype)
    model.load_state_dict(state, strict=True)
    return received


def received_tensors(arrays: ArrayRecord, state: Mapping[str, torch.Tensor], transport: str) -> dict[str, torch.Tensor]:
    """The record's tensors, those that travelled narrowed upcast to the dtype of ``state``'s tensor."""
    if transport == "fp32":
        return arrays.to_torch_state_dict()
    reference = {k: torch.empty(0, dtype=v.dtype).numpy().dtype for k, v in state.items()}
    decoded = decode({k: a.numpy() for k, a in arrays.items()}, reference, transport)
    return {k: torch.from_numpy(v) for k, v in decoded.items()}


def local_tensors(model: nn.Module, split: Split) -> dict[str, torch.Tensor]:
    """The site-local tensors of ``model`` (what the site store keeps)."""
    state = model.state_dict()
    return {k: state[k] for k in split.local}


def load_local(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put stored site-local tensors back into ``model``."""
    state = model.state_dict()
    state.update({k: v.to(state[k].dtype) for k, v in tensors.items()})
    model.load_state_dict(state, strict=True)


def ensure_no_local_keys(record: ArrayRecord, split: Split, site: str) -> None:
    """Refuse to send a record holding any site-local key."""
    leaked = sorted(set(record.keys()) & set(split.local))
    if leaked:
        raise LocalKeyLeakError(f"site {site}: refusing to send site-local tensors {leaked[:5]}")


def shared_record(model: nn.Module, split: Split, site: str, transport: str = "fp32") -> ArrayRecord:
    """ArrayRecord of the shared tensors only, in the transport dtype, checked by :func:`ensure_no_local_keys`."""
    state = model.state_dict()
    if transport == "fp32":
        record = ArrayRecord({k: state[k].detach().cpu() for k in split.shared})
    else:
        arrays = encode({k: state[k].detach().cpu().numpy() for k in split.shared}, transport)
        record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    ensure_no_local_keys(record, split, site)
    return record
