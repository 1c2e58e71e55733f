"""Server checkpoints: atomic, verified, resumable only into the same run."""

import os

import pytest
import torch

from server.checkpoint import CheckpointError, CheckpointStore, ServerCheckpoint


def _ckpt(rnd, value=1.0):
    return ServerCheckpoint(rnd, "run", "fp", "fedbn", {"w": torch.full((2,), value), "n": torch.tensor(rnd)}, {}, [{"round": rnd}])


def test_latest_is_the_newest_and_old_ones_are_pruned(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for rnd in (1, 2, 3):
        store.save(_ckpt(rnd, float(rnd)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0002.pt", "round-0003.pt"]
    latest = store.latest(run_name="run", fingerprint="fp", policy="fedbn")
    assert latest.round == 3 and torch.equal(latest.arrays["w"], torch.full((2,), 3.0))
    assert latest.history == [{"round": 3}]


def test_no_checkpoint_means_start_at_round_one(tmp_path):
    assert CheckpointStore(tmp_path / "none").latest(run_name="run", fingerprint="fp", policy="fedbn") is None


def test_other_run_or_architecture_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(_ckpt(1))
    with pytest.raises(CheckpointError, match="fingerprint is 'fp', this run has 'zz'"):
        store.latest(run_name="run", fingerprint="zz", policy="fedbn")
    with pytest.raises(CheckpointError, match="run is 'run'"):
        store.latest(run_name="other", fingerprint="fp", policy="fedbn")


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(_ckpt(1))
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        store.save(_ckpt(2))
    monkeypatch.undo()
    assert store.latest(run_name="run", fingerprint="fp", policy="fedbn").round == 1
    assert [p.name for p in tmp_path.iterdir()] == ["round-0001.pt"]


def test_corrupt_checkpoint_is_named(tmp_path):
    store = CheckpointStore(tmp_path)
    path = store.save(_ckpt(1))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="round-0001.pt: unreadable"):
        store.latest(run_name="run", fingerprint="fp", policy="fedbn")
