"""Per-round server checkpoints, written atomically, and resume at the next round.

A checkpoint holds what the next round needs: the round number, the global
shared tensors, the strategy's server-side state (FedAdam moments), the history
of metrics, and the identity of the run (run name, architecture fingerprint,
policy). Loading one written for a different run or architecture is an error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from shared_models.durable import atomic_torch_save, read_torch, tensors_checksum

log = logging.getLogger("fedsite.server")
FORMAT_VERSION = 1
_NAME = re.compile(r"round-(\d{4,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt or belongs to a different run."""


@dataclass
class ServerCheckpoint:
    """Everything needed to continue a federation after round ``round``."""

    round: int
    run_name: str
    fingerprint: str
    policy: str
    arrays: dict[str, torch.Tensor]
    strategy_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def arrays_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def tensors_to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(t.numpy()) for k, t in tensors.items()})


MOMENTS = ("m_t", "v_t")  # FedOpt family: dicts key -> moment
MOMENTUM = "momentum_vector"  # FedAvgM: a list in key order


def strategy_state(strategy: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Server-side optimiser state: FedOpt-family moments, FedAvgM's momentum (empty otherwise)."""
    state = {}
    for attr in MOMENTS:
        value = getattr(strategy, attr, None)
        if value:
            state[attr] = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in value.items()}
    momentum = getattr(strategy, MOMENTUM, None)
    if momentum:
        state[MOMENTUM] = {f"{i:06d}": torch.from_numpy(np.array(v, copy=True)) for i, v in enumerate(momentum)}
    return state


def restore_strategy_state(strategy: Any, state: dict[str, dict[str, torch.Tensor]]) -> None:
    for attr, arrays in state.items():
        if attr == MOMENTUM:
            setattr(strategy, attr, [arrays[k].numpy() for k in sorted(arrays)])
        else:
            setattr(strategy, attr, {k: t.numpy() for k, t in arrays.items()})


class CheckpointStore:
    """``<dir>/round-NNNN.pt`` files; keeps the newest ``keep`` of them."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep

    def _files(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.search(p.name))]
        return sorted(found)

    def save(self, ckpt: ServerCheckpoint) -> Path:
        path = self.directory / f"round-{ckpt.round:04d}.pt"
        blob = {
            "format": FORMAT_VERSION,
            "round": ckpt.round,
            "run": ckpt.run_name,
            "fingerprint": ckpt.fingerprint,
            "policy": ckpt.policy,
            "arrays": ckpt.arrays,
            "checksum": tensors_checksum(ckpt.arrays),
            "strategy_state": ckpt.strategy_state,
            "history": ckpt.history,
        }
        atomic_torch_save(blob, path)
        for _, old in self._files()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self, *, run_name: str, fingerprint: str, policy: str) -> ServerCheckpoint | None:
        """Newest valid checkpoint of this run, or ``None`` if there is none."""
        files = self._files()
        if not files:
            return None
        path = files[-1][1]
        try:
            blob = read_torch(path)
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint ({exc.__class__.__name__}: {exc})") from exc
        if blob.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: unknown checkpoint format {blob.get('format')!r}")
        for key, want in (("run", run_name), ("fingerprint", fingerprint), ("policy", policy)):
            if blob[key] != want:
                raise CheckpointError(f"{path}: checkpoint {key} is {blob[key]!r}, this run has {want!r}")
        if tensors_checksum(blob["arrays"]) != blob["checksum"]:
            raise CheckpointError(f"{path}: checksum mismatch, the checkpoint is corrupt")
        return ServerCheckpoint(
            round=blob["round"],
            run_name=blob["run"],
            fingerprint=blob["fingerprint"],
            policy=blob["policy"],
            arrays=blob["arrays"],
            strategy_state=blob["strategy_state"],
            history=blob["history"],
        )


def resume(store: CheckpointStore, strategy: Any, *, run_name: str, fingerprint: str, policy: str) -> ServerCheckpoint | None:
    """The newest checkpoint of this run with the strategy's moments put back, or ``None`` to start at round 1."""
    ckpt = store.latest(run_name=run_name, fingerprint=fingerprint, policy=policy)
    if ckpt is not None:
        restore_strategy_state(strategy, ckpt.strategy_state)
        log.info("resuming after the round-%d checkpoint", ckpt.round)
    return ckpt
