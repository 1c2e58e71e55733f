"""`fedsite reference`: the plain PyTorch loop against fedsite's pooled arm of a finished run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client.site_inputs import site_tensors
from client.data import load_site, split_cases
from client.site_paths import resolve_site
from client.trainer import evaluate_dice
from shared_models import build_model
from shared_models.protocol import SIM_PARTITION_KEY
from simulations.cell_identity import code_version
from simulations.cells import Cell
from simulations.cli import main
from simulations.reference import PlainSettings, dice_of_labels, reference_data, train_plain
from tests.helpers import TINY_EXPERIMENT

SEEDS = (0, 1)
TINY_POOLED = TINY_EXPERIMENT.replace("methods: [fedbn]", "methods: [pooled]").replace("seeds: [0]", "seeds: [0, 1]").replace(
    "rounds: 2", "rounds: 1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny pooled simulation (2 sites, 2 seeds, 1 round) and its reference."""
    root = tmp_path_factory.mktemp("reference")
    config = root / "tiny.yaml"
    config.write_text(TINY_POOLED)
    out = root / "out"
    assert main(["simulate", "--config", str(config), "--out", str(out)]) == 0
    assert main(["reference", "--run", str(out)]) == 0
    return out


@pytest.mark.slow
def test_reference_json_structure(finished_run):
    # Prepare
    results = json.loads((finished_run / "results.json").read_text())
    # Execute
    ref = json.loads((finished_run / "reference.json").read_text())
    # Assert
    sites = results["sites"]
    assert ref["code_version"] == code_version() and ref["run_code_version"] == results["code_version"]
    assert ref["settings"]["seeds"] == list(SEEDS) and ref["settings"]["epochs"] == 1 and ref["settings"]["batch_size"] == 4
    assert ref["settings"]["split_seeds"] == {str(s): s for s in SEEDS}  # data.split_seed (0) + seed, as simulate
    assert [r["seed"] for r in ref["runs"]] == list(SEEDS)
    for r in ref["runs"]:
        assert set(r["per_site"]) == set(sites) and r["n_train"] == 12
        assert all(0.0 <= v["dice"] <= 1.0 for v in r["per_site"].values())
        assert r["mean_dice"] == pytest.approx(np.mean([v["dice"] for v in r["per_site"].values()]))
    pooled = [r for r in results["runs"] if r["method"] == "pooled"]
    for site in sites:
        row = ref["summary"]["per_site"][site]
        assert row["fedsite_pooled"] == pytest.approx(np.mean([r["per_site"][site]["dice"] for r in pooled]))
        assert row["plain"] == pytest.approx(np.mean([r["per_site"][site]["dice"] for r in ref["runs"]]))
    diff = ref["summary"]["mean"]["difference"]
    expected = np.mean([p["per_site"][s]["dice"] - q["per_site"][s]["dice"] for p, q in zip(pooled, ref["runs"]) for s in sites])
    assert diff["n"] == len(SEEDS) * len(sites) and diff["diff"] == pytest.approx(expected)
    assert diff["ci95"] is None or diff["ci95"][0] <= diff["diff"] <= diff["ci95"][1]
    md = (finished_run / "reference.md").read_text()
    assert "| site | fedsite pooled | plain PyTorch |" in md and all(f"| {s} |" in md for s in sites)


@pytest.mark.slow
def test_another_lr_is_written_beside_the_runs_own_reference(finished_run):
    """A hand-written script's own lr: its own files; the run's-lr reference stays as it was."""
    before = (finished_run / "reference.json").read_text()
    assert main(["reference", "--run", str(finished_run), "--lr", "0.02"]) == 0
    other = json.loads((finished_run / "reference-lr0.02.json").read_text())
    ref = json.loads(before)
    assert (finished_run / "reference.json").read_text() == before and (finished_run / "reference-lr0.02.md").is_file()
    assert (other["settings"]["lr"], other["settings"]["run_lr"]) == (0.02, ref["settings"]["lr"])
    assert other["summary"]["mean"]["plain"] != ref["summary"]["mean"]["plain"]  # the plain loop trained at 0.02


@pytest.mark.slow
def test_split_is_fedsites(finished_run):
    ref = json.loads((finished_run / "reference.json").read_text())
    for seed, plain in zip(SEEDS, ref["runs"]):
        # Prepare: what the ClientApp of each simulated node loaded in this cell
        cell = Cell(finished_run / "runs" / f"pooled-seed{seed}")
        cfg = cell.config
        round_cfg = cfg.round_config("")
        sites = cfg.site_list
        # Execute
        data = reference_data(cfg, num_classes=3)
        # Assert
        pooled_node = site_tensors(resolve_site({SIM_PARTITION_KEY: len(sites)}, round_cfg), round_cfg)
        assert torch.equal(data.train_x, pooled_node.train_x) and torch.equal(data.train_y, pooled_node.train_y)
        for pid, site in enumerate(sites):
            node = site_tensors(resolve_site({SIM_PARTITION_KEY: pid}, round_cfg), round_cfg)
            assert torch.equal(data.test[site].x, node.test_x) and torch.equal(data.test[site].y, node.test_y)
            all_names = [c.name for c in load_site(Path(cfg.data_dir) / site, test_fraction=0.0).train]
            _, fedsite_test = split_cases(all_names, round_cfg.test_fraction, round_cfg.split_seed)
            assert plain["per_site"][site]["test_cases"] == data.test[site].names == fedsite_test
            assert plain["per_site"][site]["n_test"] == len(fedsite_test)


def _tiny_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 1, 16, 16, generator=g), torch.randint(0, 3, (6, 1, 16, 16), generator=g)


SPEC = {"name": "unet", "channels": [4, 8], "norm": "batch", "out-channels": 3}


def test_plain_loop_is_deterministic_per_seed():
    # Prepare
    x, y = _tiny_data()
    settings = PlainSettings(lr=3e-3, batch_size=4, epochs=2)
    # Execute
    a, b, c = (train_plain(SPEC, x, y, settings, seed, torch.device("cpu")).state_dict() for seed in (0, 0, 1))
    untrained = train_plain(SPEC, x, y, PlainSettings(3e-3, 4, 0), 0, torch.device("cpu")).state_dict()
    # Assert
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    init = build_model(SPEC, seed=0).state_dict()  # the network fedsite builds for seed 0
    assert all(torch.equal(untrained[k], init[k]) for k in init)
    assert any(not torch.equal(a[k], init[k]) for k in init if init[k].is_floating_point())


class FixedLogits(nn.Module):
    """Returns the same logits whatever the input (a fixed prediction)."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("logits", nn.functional.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float())

    def forward(self, x):
        return self.logits[: len(x)]


def test_dice_by_hand():
    true = torch.tensor([[[[1, 1], [2, 0]]], [[[0, 0], [1, 1]]]])
    pred = torch.tensor([[[[1, 0], [2, 2]]], [[[2, 0], [1, 1]]]])
    # class 1: 2/3 and 1 -> 5/6; class 2: 2/3 (absent from the second case's truth: ignored)
    assert dice_of_labels(pred, true, 3) == pytest.approx((5 / 6 + 2 / 3) / 2)


def test_dice_agrees_with_fedsites_evaluate_dice():
    # Prepare: a fixed prediction, one class missing from one case's truth
    g = torch.Generator().manual_seed(3)
    true = torch.randint(0, 4, (5, 1, 12, 12), generator=g)
    true[0][true[0] == 3] = 0
    pred = torch.where(torch.rand(true.shape, generator=g) < 0.7, true, torch.randint(0, 4, true.shape, generator=g))
    # Execute
    ours = dice_of_labels(pred, true, 4)
    fedsite = evaluate_dice(FixedLogits(pred, 4), torch.zeros(5, 1, 12, 12), true, 4, with_hd95=False).dice
    # Assert
    assert 0.5 < ours < 1.0 and ours == pytest.approx(fedsite, abs=1e-6)


def _results(run_dir, methods):
    run_dir.mkdir(parents=True)
    runs = [{"method": m, "seed": 0, "per_site": {}} for m in methods]
    (run_dir / "results.json").write_text(json.dumps({"sites": ["site-a"], "runs": runs, "code_version": "x"}))


@pytest.mark.parametrize("methods", [("fedbn", "local"), None])
def test_no_pooled_method_is_a_one_line_error(tmp_path, capsys, methods):
    # Prepare
    run_dir = tmp_path / "run"
    if methods:
        _results(run_dir, methods)
    # Execute
    rc = main(["reference", "--run", str(run_dir)])
    # Assert
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and str(run_dir) in err
    assert ("'pooled'" in err and "fedbn, local" in err) if methods else "results.json" in err
