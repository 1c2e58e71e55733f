"""The site's optimizer state across rounds: a durable file next to its local tensors, never sent.

Adam's moments (SGD's momentum) are what a continuous local optimizer carries
from one step to the next; rebuilding it every round throws them away and
restarts Adam's bias correction. The site keeps them in
``<state_dir>/<run>/optimizer_state.pt`` (atomic write; the previous round's
file is kept, so a resumed round starts from the state written before it),
guarded by run, site, model fingerprint and optimizer name. A file that does
not fit is ignored with one log line naming the site and the file: the round
then trains with a fresh optimizer, it never fails for it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared_models.durable import atomic_torch_save, read_torch, tensors_checksum

from .optim_recipe import load_moments
from .site_state import run_dir

FORMAT_VERSION = 1
OPTIMIZER_FILE = "optimizer_state.pt"
log = logging.getLogger("fedsite.client")


@dataclass(frozen=True)
class StoredOptimizer:
    """An optimizer ``state_dict`` read back, with the round that wrote it and where it came from."""

    state: dict[str, Any]
    round: int
    source: str  # "site <id>, <file>": named in the log line if it does not fit the optimizer


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state's tensors under flat names (what the checksum covers)."""
    return {f"{i}.{k}": v for i, entry in state["state"].items() for k, v in entry.items() if torch.is_tensor(v)}


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    cpu = {i: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in entry.items()}
           for i, entry in state["state"].items()}
    return {"state": cpu, "param_groups": state["param_groups"]}


class _Unfit(Exception):
    """Why a stored optimizer file cannot be used for this round."""


class OptimizerStateStore:
    """The optimizer state of one site for one run (``<state_dir>/<run>/optimizer_state.pt``)."""

    def __init__(self, state_dir: str | Path, run_name: str, site: str, file_name: str = OPTIMIZER_FILE):
        self.site, self.run_name = site, run_name
        self.path = run_dir(state_dir, run_name) / file_name
        self.previous = self.path.with_name(file_name.replace(".pt", ".previous.pt"))

    def save(self, state: dict[str, Any], *, fingerprint: str, optimizer: str, round_: int) -> None:
        """Atomically write ``state`` (an optimizer ``state_dict``), keeping the previous round's file."""
        cpu = _to_cpu(state)
        if self.path.exists():
            os.replace(self.path, self.previous)
        atomic_torch_save({"format": FORMAT_VERSION, "site": self.site, "run": self.run_name, "fingerprint": fingerprint,
                           "optimizer": optimizer, "round": round_, "checksum": tensors_checksum(_tensors(cpu)),
                           "optimizer_state": cpu}, self.path)

    def load(self, *, fingerprint: str, optimizer: str, before_round: int) -> StoredOptimizer | None:
        """The newest fitting state written before ``before_round``; None (one log line if a file was there) otherwise."""
        reasons = []
        for path in (self.path, self.previous):
            if not path.exists():
                continue
            try:
                stored = self._read(path, fingerprint, optimizer)
            except _Unfit as exc:
                reasons.append(f"{path.name}: {exc}")
                continue
            if stored.round < before_round:
                return stored
            reasons.append(f"{path.name}: written in round {stored.round}, not before round {before_round}")
        if reasons:
            log.warning("site %s: optimizer state in %s ignored (%s); this round starts a fresh optimizer",
                        self.site, self.path.parent, "; ".join(reasons))
        return None

    def _read(self, path: Path, fingerprint: str, optimizer: str) -> StoredOptimizer:
        try:
            blob = read_torch(path)
        except Exception as exc:  # torch raises several types for truncated/corrupt files
            raise _Unfit(f"unreadable ({exc.__class__.__name__})") from exc
        if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
            raise _Unfit("not a fedsite optimizer-state file")
        expected = {"run": self.run_name, "site": self.site, "fingerprint": fingerprint, "optimizer": optimizer}
        for key, value in expected.items():
            if blob.get(key) != value:
                raise _Unfit(f"{key} {blob.get(key)!r}, this round's is {value!r}")
        try:
            state = blob["optimizer_state"]
            ok = tensors_checksum(_tensors(state)) == blob["checksum"]
        except (KeyError, TypeError, AttributeError) as exc:
            raise _Unfit(f"malformed ({exc.__class__.__name__})") from exc
        if not ok:
            raise _Unfit("checksum mismatch (corrupt)")
        return StoredOptimizer(state, int(blob["round"]), f"site {self.site}, {path}")


def restore(optimizer: torch.optim.Optimizer, stored: StoredOptimizer | None) -> bool:
    """Load ``stored`` into ``optimizer``; a state that does not fit is logged once and skipped."""
    if stored is None:
        return False
    try:
        load_moments(optimizer, stored.state)
    except ValueError as exc:
        optimizer.state.clear()
        log.warning("%s: optimizer state ignored (%s); this round starts a fresh optimizer", stored.source, exc)
        return False
    return True
