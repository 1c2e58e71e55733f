"""Durable store of a site's local tensors (its normalization), one file per run.

Flower's ``Context.state`` lives in the SuperNode's memory and is lost when the
daemon restarts; a site's BatchNorm statistics are the whole point of FedBN, so
they live on disk instead. Each write goes to a temporary file in the same
folder, is fsync'ed, then atomically renamed over the old file: a crash leaves
either the old or the new state, never a torn one. The file records the run name,
the architecture fingerprint, the policy and a SHA-256 over the tensors; a load
that does not match any of them is refused with a message naming the file.
"""

from __future__ import annotations

import os

from collections.abc import Mapping
from pathlib import Path

import torch

from shared_models.durable import atomic_torch_save, read_torch, tensors_checksum

FORMAT_VERSION = 1
STATE_FILE = "local_state.pt"
# The local tensors as the site would deploy them: after the last evaluation, with refreshed statistics.
DEPLOYED_FILE = "deployed_state.pt"
# Every tensor of a model fine-tuned at the site (personalisation at the end of a federation); never sent.
PERSONAL_FILE = "personal_state.pt"


class SiteStateError(RuntimeError):
    """The stored site state is corrupt or belongs to another run/architecture."""


def run_dir(state_dir: str | Path, run_name: str) -> Path:
    """``<state_dir>/<run>``: the folder of one run's files at a site (a plain folder name only)."""
    if not run_name or "/" in run_name or run_name.startswith("."):
        raise SiteStateError(f"invalid run name {run_name!r}: use a plain folder name")
    return Path(state_dir) / run_name


class SiteStateStore:
    """The local tensors of one site for one run (``<state_dir>/<run>/local_state.pt``)."""

    def __init__(self, state_dir: str | Path, run_name: str, site: str, file_name: str = STATE_FILE):
        self.site = site
        self.run_name = run_name
        self.path = run_dir(state_dir, run_name) / file_name
        self.previous = self.path.with_name(file_name.replace(".pt", ".previous.pt"))

    def exists(self) -> bool:
        return self.path.exists() or self.previous.exists()

    def save(self, tensors: Mapping[str, torch.Tensor], *, fingerprint: str, policy: str, round_: int) -> str:
        """Atomically write ``tensors``; returns their checksum."""
        cpu = {k: v.detach().cpu().clone() for k, v in tensors.items()}
        checksum = tensors_checksum(cpu)
        if self.path.exists():  # the round before stays readable: a resumed federation may repeat this round
            os.replace(self.path, self.previous)
        atomic_torch_save(
            {
                "format": FORMAT_VERSION,
                "site": self.site,
                "run": self.run_name,
                "fingerprint": fingerprint,
                "policy": policy,
                "round": round_,
                "checksum": checksum,
                "tensors": cpu,
            },
            self.path,
        )
        return checksum

    def load(
        self, *, fingerprint: str, policy: str, expected_keys: set[str], before_round: int | None = None
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Tensors and the round they were written in; refuses any mismatch.

        ``before_round``: the newest state written before that round. A federation
        resumed after its last checkpoint repeats a round that some sites may have
        trained already; they must start it from the state they had before it.
        """
        path = self.path if self.path.exists() else self.previous
        tensors, round_ = self._read(path, fingerprint, policy, expected_keys)
        if before_round is None or round_ < before_round:
            return tensors, round_
        if path == self.path and self.previous.exists():
            older, older_round = self._read(self.previous, fingerprint, policy, expected_keys)
            if older_round < before_round:
                return older, older_round
        raise SiteStateError(
            f"{self.path}: no site state from before round {before_round} (newest is from round {round_}: an earlier "
            "federation of the same run name?); use a new run name or move the file away"
        )

    def _read(self, path: Path, fingerprint: str, policy: str, expected_keys: set[str]) -> tuple[dict[str, torch.Tensor], int]:
        try:
            blob = read_torch(path)
        except FileNotFoundError:
            raise
        except Exception as exc:  # torch raises several types for truncated/corrupt files
            raise SiteStateError(f"{path}: unreadable site state ({exc.__class__.__name__}: {exc})") from exc
        if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
            raise SiteStateError(f"{path}: not a fedsite site-state file (format {blob.get('format') if isinstance(blob, dict) else '?'})")
        if blob["run"] != self.run_name or blob["site"] != self.site:
            raise SiteStateError(
                f"{path}: written for run {blob['run']!r} at site {blob['site']!r}, not run {self.run_name!r} at site {self.site!r}"
            )
        if blob["fingerprint"] != fingerprint:
            raise SiteStateError(
                f"{path}: architecture fingerprint {blob['fingerprint']} does not match this model ({fingerprint}); "
                "the model configuration changed since this site state was written. Use a new run name or move the file away."
            )
        if blob["policy"] != policy:
            raise SiteStateError(f"{path}: written under policy {blob['policy']!r}, this run uses {policy!r}")
        tensors = blob["tensors"]
        if tensors_checksum(tensors) != blob["checksum"]:
            raise SiteStateError(f"{path}: checksum mismatch, the site state is corrupt")
        if set(tensors) != expected_keys:
            missing, extra = sorted(expected_keys - set(tensors)), sorted(set(tensors) - expected_keys)
            raise SiteStateError(f"{path}: local keys differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})")
        return tensors, int(blob["round"])
