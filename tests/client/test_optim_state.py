"""The optimizer state a site keeps across rounds: guarded, resumable, ignored (never fatal) when it does not fit."""

import logging

import pytest
import torch

from client.optim_recipe import build_optimizer
from client.optim_state import OPTIMIZER_FILE, OptimizerStateStore, StoredOptimizer, restore
from client.trainer import TrainSettings
from shared_models import build_model

SPEC = {"name": "unet", "channels": [4, 8], "norm": "batch", "out-channels": 3}


def _stepped(steps: int, spec=SPEC, optimizer="adam"):
    """An optimizer after ``steps`` steps (Adam's ``step`` counter says how many)."""
    torch.manual_seed(0)
    model = build_model(spec, seed=0)
    opt = build_optimizer(model, TrainSettings(optimizer=optimizer))
    for _ in range(steps):
        model(torch.randn(2, 1, 16, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _step_count(stored: StoredOptimizer) -> float:
    return float(next(iter(stored.state["state"].values()))["step"])


def _store(tmp_path, run="run-a", site="site-a"):
    return OptimizerStateStore(tmp_path / "state", run, site)


def test_saved_state_round_trips_into_a_fresh_optimizer(tmp_path):
    store = _store(tmp_path)
    model, opt = _stepped(3)
    store.save(opt.state_dict(), fingerprint="fp", optimizer="adam", round_=1)
    assert store.path == tmp_path / "state" / "run-a" / OPTIMIZER_FILE
    stored = store.load(fingerprint="fp", optimizer="adam", before_round=2)
    fresh = build_optimizer(model, TrainSettings())
    assert restore(fresh, stored)
    for a, b in zip(fresh.state.values(), opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and float(a["step"]) == 3.0


def test_a_resumed_round_gets_the_state_written_before_it(tmp_path):
    store = _store(tmp_path)
    for rnd in (1, 2):
        store.save(_stepped(rnd)[1].state_dict(), fingerprint="fp", optimizer="adam", round_=rnd)
    assert _step_count(store.load(fingerprint="fp", optimizer="adam", before_round=3)) == 2.0
    repeated = store.load(fingerprint="fp", optimizer="adam", before_round=2)  # round 2 again, after a restart
    assert repeated.round == 1 and _step_count(repeated) == 1.0


def test_only_a_newer_state_means_a_fresh_optimizer_with_one_log_line(tmp_path, caplog):
    store = _store(tmp_path)
    store.save(_stepped(1)[1].state_dict(), fingerprint="fp", optimizer="adam", round_=5)
    with caplog.at_level(logging.WARNING, logger="fedsite.client"):
        assert store.load(fingerprint="fp", optimizer="adam", before_round=3) is None
    (line,) = caplog.messages
    assert "site site-a" in line and str(store.path.parent) in line and "round 5" in line


def _corrupt(path):
    path.write_bytes(b"not a torch file")


def _tamper(path):
    blob = torch.load(path, weights_only=True)
    next(iter(blob["optimizer_state"]["state"].values()))["exp_avg"].add_(1.0)
    torch.save(blob, path)


@pytest.mark.parametrize("load_as,spoil,reason", [
    ({"fingerprint": "other"}, None, "fingerprint 'fp'"),
    ({"optimizer": "sgd"}, None, "optimizer 'adam'"),
    ({}, _corrupt, "unreadable"),
    ({}, _tamper, "checksum"),
])
def test_a_stale_or_corrupt_file_is_ignored_with_one_line_naming_site_and_file(tmp_path, caplog, load_as, spoil, reason):
    store = _store(tmp_path)
    store.save(_stepped(1)[1].state_dict(), fingerprint="fp", optimizer="adam", round_=1)
    if spoil is not None:
        spoil(store.path)
    with caplog.at_level(logging.WARNING, logger="fedsite.client"):
        assert store.load(**{"fingerprint": "fp", "optimizer": "adam", **load_as}, before_round=2) is None
    (line,) = caplog.messages
    assert "site site-a" in line and OPTIMIZER_FILE in line and reason in line


def test_another_runs_or_sites_file_is_not_taken(tmp_path, caplog):
    _store(tmp_path, site="site-b").save(_stepped(1)[1].state_dict(), fingerprint="fp", optimizer="adam", round_=1)
    other = _store(tmp_path, site="site-a")
    other.path.parent.mkdir(parents=True, exist_ok=True)
    _store(tmp_path, site="site-b").path.rename(other.path)  # site-b's file placed where site-a looks
    with caplog.at_level(logging.WARNING, logger="fedsite.client"):
        assert other.load(fingerprint="fp", optimizer="adam", before_round=2) is None
    assert "site 'site-b'" in caplog.messages[0]


def test_a_state_of_other_parameter_groups_is_skipped_not_fatal(caplog):
    _, opt = _stepped(1)
    other_model = build_model({**SPEC, "channels": [4, 6]}, seed=0)
    fresh = build_optimizer(other_model, TrainSettings())
    with caplog.at_level(logging.WARNING, logger="fedsite.client"):
        assert not restore(fresh, StoredOptimizer(opt.state_dict(), 1, "site site-a, /x/optimizer_state.pt"))
    assert not fresh.state and "site site-a, /x/optimizer_state.pt" in caplog.messages[0]
