"""Durable site state: atomic writes, checksums, fingerprint and run checks."""

import os

import pytest
import torch

from client.site_state import SiteStateError, SiteStateStore


def _tensors():
    return {"n.running_mean": torch.arange(4.0), "n.num_batches_tracked": torch.tensor(7), "n.weight": torch.ones(4)}


def test_round_trip_is_byte_identical(tmp_path):
    store = SiteStateStore(tmp_path, "run1", "site-a")
    checksum = store.save(_tensors(), fingerprint="fp", policy="fedbn", round_=3)
    loaded, rnd = store.load(fingerprint="fp", policy="fedbn", expected_keys=set(_tensors()))
    assert rnd == 3 and len(checksum) == 64
    for key, value in _tensors().items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)


def test_crash_during_write_keeps_the_old_state(tmp_path, monkeypatch):
    store = SiteStateStore(tmp_path, "run1", "site-a")
    store.save(_tensors(), fingerprint="fp", policy="fedbn", round_=1)
    before = store.path.read_bytes()

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    newer = {k: v + 1 for k, v in _tensors().items()}
    with pytest.raises(OSError, match="power cut"):
        store.save(newer, fingerprint="fp", policy="fedbn", round_=2)
    assert store.path.read_bytes() == before
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temp file left behind


def test_fingerprint_mismatch_is_a_clear_error(tmp_path):
    store = SiteStateStore(tmp_path, "run1", "site-a")
    store.save(_tensors(), fingerprint="aaaa", policy="fedbn", round_=1)
    with pytest.raises(SiteStateError, match=r"local_state.pt: architecture fingerprint aaaa does not match this model \(bbbb\)"):
        store.load(fingerprint="bbbb", policy="fedbn", expected_keys=set(_tensors()))


def test_policy_and_run_mismatch(tmp_path):
    SiteStateStore(tmp_path, "run1", "site-a").save(_tensors(), fingerprint="fp", policy="fedbn", round_=1)
    with pytest.raises(SiteStateError, match="policy 'fedbn'"):
        SiteStateStore(tmp_path, "run1", "site-a").load(fingerprint="fp", policy="silobn", expected_keys=set(_tensors()))
    with pytest.raises(SiteStateError, match="site 'site-a'"):
        SiteStateStore(tmp_path, "run1", "site-b").load(fingerprint="fp", policy="fedbn", expected_keys=set(_tensors()))


def test_corruption_is_detected(tmp_path):
    store = SiteStateStore(tmp_path, "run1", "site-a")
    store.save(_tensors(), fingerprint="fp", policy="fedbn", round_=1)
    blob = torch.load(store.path, weights_only=True)
    blob["tensors"]["n.weight"][0] = 5.0  # bit rot that keeps the file readable
    torch.save(blob, store.path)
    with pytest.raises(SiteStateError, match="checksum mismatch"):
        store.load(fingerprint="fp", policy="fedbn", expected_keys=set(_tensors()))
    store.path.write_bytes(store.path.read_bytes()[:50])  # truncated file
    with pytest.raises(SiteStateError, match="unreadable site state"):
        store.load(fingerprint="fp", policy="fedbn", expected_keys=set(_tensors()))


def test_key_set_mismatch(tmp_path):
    store = SiteStateStore(tmp_path, "run1", "site-a")
    store.save(_tensors(), fingerprint="fp", policy="fedbn", round_=1)
    with pytest.raises(SiteStateError, match="local keys differ"):
        store.load(fingerprint="fp", policy="fedbn", expected_keys={"n.weight"})


def test_run_name_must_be_a_plain_folder(tmp_path):
    with pytest.raises(SiteStateError, match="invalid run name"):
        SiteStateStore(tmp_path, "../escape", "site-a")


def test_a_repeated_round_starts_from_the_state_before_it(tmp_path):
    """A federation resumed after round 2's checkpoint repeats round 3, which a site may have trained already."""
    store = SiteStateStore(tmp_path, "run1", "site-a")
    for rnd in (1, 2, 3):
        store.save({k: v + rnd for k, v in _tensors().items()}, fingerprint="fp", policy="fedbn", round_=rnd)
    keys = set(_tensors())
    tensors, rnd = store.load(fingerprint="fp", policy="fedbn", expected_keys=keys, before_round=3)
    assert rnd == 2 and torch.equal(tensors["n.weight"], torch.ones(4) + 2)
    assert store.load(fingerprint="fp", policy="fedbn", expected_keys=keys, before_round=4)[1] == 3
    # a state of a later round than the federation knows: never used silently
    with pytest.raises(SiteStateError, match=r"no site state from before round 1 \(newest is from round 3"):
        store.load(fingerprint="fp", policy="fedbn", expected_keys=keys, before_round=1)
