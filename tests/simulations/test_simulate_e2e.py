"""End to end on Flower's simulation engine: real site folders, real messages."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

import server.rounds
from shared_models import build_model, partition
from simulations.cli import main
from tests.helpers import TINY_EXPERIMENT

pytestmark = pytest.mark.slow

TINY = TINY_EXPERIMENT


@pytest.fixture
def spy_replies(monkeypatch):
    """Every train reply the ServerApp receives (it runs in this process)."""
    seen = []
    original = server.rounds.aggregate_shared

    def spy(strategy, rnd, replies, reference, parameter_keys=None):
        seen.extend((rnd, set(r.content["arrays"].keys())) for r in replies)
        return original(strategy, rnd, replies, reference, parameter_keys)

    monkeypatch.setattr(server.rounds, "aggregate_shared", spy)
    return seen


def test_fedbn_simulation_no_local_key_leaves_a_site(tmp_path, spy_replies):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(config), "--out", str(out)]) == 0

    # Message level: every reply carried exactly the shared keys, never a local one.
    model = build_model({"name": "unet", "channels": [4, 8], "norm": "batch", "out-channels": 3})
    split = partition(model, "fedbn")
    assert len(spy_replies) == 2 * 2  # 2 rounds x 2 sites
    for _, keys in spy_replies:
        assert keys == set(split.shared)
        assert not keys & set(split.local)

    # The local tensors live on disk, per site, and differ between sites.
    states = {}
    for site in ("site-a", "site-b"):
        path = out / "runs" / "fedbn-seed0" / "site-state" / site / "fedbn-seed0" / "local_state.pt"
        blob = torch.load(path, weights_only=True)
        assert set(blob["tensors"]) == set(split.local) and blob["round"] == 2
        states[site] = blob["tensors"]
    assert not torch.equal(states["site-a"]["inc.norm0.running_mean"], states["site-b"]["inc.norm0.running_mean"])

    results = json.loads((out / "results.json").read_text())
    assert results["sites"] == ["site-a", "site-b"]
    (run,) = results["runs"]
    assert {"method", "seed", "rounds", "per_site", "mean_dice", "wall_s", "bytes_sent", "bytes_received"} <= set(run)
    assert set(run["per_site"]) == {"site-a", "site-b"}
    assert all(0.0 <= v["dice"] <= 1.0 and v["n_test"] == 2 for v in run["per_site"].values())
    assert run["mean_dice"] == pytest.approx(np.mean([v["dice"] for v in run["per_site"].values()]))
    assert run["bytes_sent"] > 0 and run["bytes_received"] > 0
    # the driver and its Ray workers together: more than the driver alone ever holds
    assert run["peak_memory_bytes"] > 2 * 2**20 * 300
    assert results["summary"]["fedbn"]["per_site"]["site-a"] == pytest.approx(run["per_site"]["site-a"]["dice"])
    assert "| fedbn |" in (out / "results.md").read_text()
    # One checkpoint per round, atomically written.
    assert sorted(p.name for p in (out / "runs" / "fedbn-seed0" / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    # The report page and its figures.
    for name in ("report.md", "results.csv", "dice_per_round.png", "dice_per_site.png", "examples.png"):
        assert (out / name).stat().st_size > 0, name
    assert "hd95" in run["per_site"]["site-a"]


def test_finished_cells_are_not_rerun(tmp_path, monkeypatch):
    import simulations.engine

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.replace("rounds: 2", "rounds: 1"))
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(config), "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())["runs"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(simulations.engine, "run_simulated_federation", must_not_run)
    assert main(["simulate", "--config", str(config), "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == first
    # A changed configuration is a different cell: it must run (and here it fails loudly).
    assert main(["simulate", "--config", str(config), "--out", str(out), "--lr", "0.02"]) == 1


def _write_foreign_dataset(root, sites=("hospital-x", "hospital-y"), shape=(91, 109), cases=6):
    """A layout the repository never generated: odd sizes, 2 foreground classes."""
    rng = np.random.default_rng(7)
    for s, site in enumerate(sites):
        for sub in ("images", "labels"):
            (root / site / sub).mkdir(parents=True)
        for c in range(cases):
            label = np.zeros(shape, np.uint8)
            y, x = rng.integers(10, 50), rng.integers(10, 60)
            label[y : y + 30, x : x + 35] = 1
            label[y + 8 : y + 18, x + 10 : x + 20] = 2
            image = (label * (50.0 if s == 0 else -30.0) + rng.normal(0, 5, shape) + 100 * s).astype(np.float32)
            nib.save(nib.Nifti1Image(image, np.eye(4)), root / site / "images" / f"case{c}.nii.gz")
            nib.save(nib.Nifti1Image(label, np.eye(4)), root / site / "labels" / f"case{c}.nii.gz")


def test_simulate_on_a_folder_it_has_never_seen_with_pooled_baseline(tmp_path, capsys):
    data = tmp_path / "hospitals"
    _write_foreign_dataset(data)
    out = tmp_path / "out"
    code = main(["simulate", "--data", str(data), "--methods", "local,pooled", "--seeds", "0", "--rounds", "1",
                 "--batch-size", "4", "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| local |" in printed and "| pooled |" in printed and "hospital-x" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["sites"] == ["hospital-x", "hospital-y"] and results["num_classes"] == 3
    assert {r["method"] for r in results["runs"]} == {"local", "pooled"}


def test_bad_case_is_rejected_by_name_and_the_site_trains_on(tmp_path, capsys, caplog):
    data = tmp_path / "hospitals"
    _write_foreign_dataset(data, cases=3)
    bad = data / "hospital-y" / "images" / "case1.nii.gz"
    image = nib.load(bad).get_fdata().astype(np.float32)
    image[3, 3] = np.nan
    nib.save(nib.Nifti1Image(image, np.eye(4)), bad)
    with caplog.at_level("WARNING", logger="fedsite.data"):
        code = main(["simulate", "--data", str(data), "--methods", "fedbn", "--seeds", "0", "--rounds", "1", "--device", "cpu",
                     "--out", str(tmp_path / "o")])
    assert code == 0
    captured = capsys.readouterr()
    seen = captured.out + captured.err + caplog.text
    assert "hospital-y" in seen and str(bad) in seen, seen[-2000:]


def _per_site(out):
    return {r["method"]: r["per_site"] for r in json.loads((out / "results.json").read_text())["runs"]}


def test_an_out_folder_of_an_earlier_run_changes_nothing(tmp_path):
    """The same command gives the same results into a fresh folder and into one an earlier run with other settings left."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.replace("rounds: 2", "rounds: 1"))
    fresh, reused = tmp_path / "fresh", tmp_path / "reused"
    assert main(["simulate", "--config", str(config), "--out", str(reused), "--lr", "0.05"]) == 0
    assert main(["simulate", "--config", str(config), "--out", str(reused)]) == 0
    assert main(["simulate", "--config", str(config), "--out", str(fresh)]) == 0
    assert _per_site(reused) == _per_site(fresh)


def test_changed_code_reruns_a_finished_cell(tmp_path, monkeypatch):
    import simulations.cell_identity as identity

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.replace("rounds: 2", "rounds: 1"))
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(config), "--out", str(out)]) == 0
    record = json.loads((out / "runs" / "fedbn-seed0" / "cell.json").read_text())
    assert record["status"] == "finished" and record["code"] == identity.code_version()
    assert json.loads((out / "results.json").read_text())["code_version"] == identity.code_version()
    monkeypatch.setattr(identity, "code_version", lambda: "another-version")
    ran = []
    import simulations.engine

    original = simulations.engine.run_simulated_federation
    monkeypatch.setattr(simulations.engine, "run_simulated_federation", lambda *a, **k: ran.append(1) or original(*a, **k))
    assert main(["simulate", "--config", str(config), "--out", str(out)]) == 0
    assert ran == [1]
