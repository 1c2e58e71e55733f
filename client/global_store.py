"""The last global shared tensors a site received, kept for ``fedsite predict``.

A site's personalised model is the global shared tensors plus its own local
tensors. The local ones already live in the site store
(``<state-dir>/<run>/local_state.pt``); this file keeps the newest global shared
tensors next to them (``<state-dir>/<run>/global_shared.pt``) together with
what is needed to rebuild the model offline: the model spec, the policy (and
its overrides), the fingerprint and the round. It is written atomically by the
ClientApp on every train message (the global model of that round) and every
evaluate message (the aggregate after the round), so ``fedsite predict`` never
needs the server and never reads a torn file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared_models.durable import atomic_torch_save, read_torch, tensors_checksum

FORMAT_VERSION = 1
GLOBAL_FILE = "global_shared.pt"


class GlobalStoreError(RuntimeError):
    """The stored global tensors are missing, corrupt or of another run."""


@dataclass
class GlobalSnapshot:
    """The newest global shared tensors of one run at one site."""

    run_name: str
    round: int
    model_spec: dict[str, Any]
    policy: str
    policy_overrides: dict[str, Any]
    fingerprint: str
    tensors: dict[str, torch.Tensor]
    intensity: str = "zscore"  # the input normalization the model was trained with
    patch_size: str = ""  # the training patch ("" whole images): prediction slides a window of this size
    target_spacing: str = ""  # with patches: the voxel size (mm) training resampled every case to


def global_path(state_dir: str | Path, run_name: str) -> Path:
    return Path(state_dir) / run_name / GLOBAL_FILE


def save_global(state_dir: str | Path, snapshot: GlobalSnapshot) -> Path:
    """Atomically write ``snapshot`` unless a newer round is already stored."""
    path = global_path(state_dir, snapshot.run_name)
    if path.exists():
        try:
            stored = read_torch(path)
            if int(stored.get("round", -1)) > snapshot.round:
                return path
        except Exception:  # a corrupt file is simply replaced
            pass
    cpu = {k: v.detach().cpu().clone() for k, v in snapshot.tensors.items()}
    atomic_torch_save(
        {
            "format": FORMAT_VERSION,
            "run": snapshot.run_name,
            "round": snapshot.round,
            "model": json.dumps(snapshot.model_spec),
            "policy": snapshot.policy,
            "policy_overrides": json.dumps(snapshot.policy_overrides),
            "fingerprint": snapshot.fingerprint,
            "intensity": snapshot.intensity,
            "patch_size": snapshot.patch_size,
            "target_spacing": snapshot.target_spacing,
            "checksum": tensors_checksum(cpu),
            "tensors": cpu,
        },
        path,
    )
    return path


def load_global(state_dir: str | Path, run_name: str) -> GlobalSnapshot:
    """The stored snapshot; refuses a missing, foreign or corrupt file, naming it."""
    path = global_path(state_dir, run_name)
    if not path.exists():
        raise GlobalStoreError(f"{path}: no global model stored yet (the site has not taken part in run {run_name!r})")
    try:
        blob = read_torch(path)
    except Exception as exc:
        raise GlobalStoreError(f"{path}: unreadable ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(blob, Mapping) or blob.get("format") != FORMAT_VERSION or blob.get("run") != run_name:
        raise GlobalStoreError(f"{path}: not a fedsite global-model file of run {run_name!r}")
    if tensors_checksum(blob["tensors"]) != blob["checksum"]:
        raise GlobalStoreError(f"{path}: checksum mismatch, the file is corrupt")
    return GlobalSnapshot(
        run_name=blob["run"],
        round=int(blob["round"]),
        model_spec=json.loads(blob["model"]),
        policy=blob["policy"],
        policy_overrides=json.loads(blob["policy_overrides"]),
        fingerprint=blob["fingerprint"],
        tensors=blob["tensors"],
        intensity=blob.get("intensity", "zscore"),
        patch_size=str(blob.get("patch_size", "")),
        target_spacing=str(blob.get("target_spacing", "")),
    )
