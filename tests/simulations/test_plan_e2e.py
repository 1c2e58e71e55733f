"""`fedsite simulate` with an unsized experiment: plan.json is written and an explicit flag wins."""

import json

import pytest

from simulations.cli import main
from tests.helpers import TINY_EXPERIMENT

pytestmark = pytest.mark.slow

# The tiny experiment without lr and batch size, and a model that gives only its widths.
UNSIZED = (TINY_EXPERIMENT.replace("model: {name: unet, channels: [4, 8], norm: batch}", "model: {channels: [4, 8]}")
           .replace("batch-size: 4\n", "").replace("rounds: 2", "rounds: 1"))


def test_plan_fills_the_unset_values_and_a_flag_overrides_it(tmp_path, capsys):
    assert "lr:" not in UNSIZED and "batch-size" not in UNSIZED and "name: unet" not in UNSIZED
    config = tmp_path / "tiny.yaml"
    config.write_text(UNSIZED)
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(config), "--batch-size", "2", "--out", str(out)]) == 0

    record = json.loads((out / "plan.json").read_text())
    plan = record["plan"]
    assert plan["patch_shape"] == [32, 32] and plan["channels"] == [16, 32, 64] and plan["batch_size"] == 6
    assert plan["num_classes"] == 3 and [fp["site_id"] for fp in record["fingerprints"]] == ["site-a", "site-b"]
    assert record["applied"] == {"model": {"name": "unet", "channels": [4, 8], "norm": "batch"}, "lr": 1e-2, "pooled_lr": 1e-3, "batch_size": 2,
                                 "patch_size": [], "target_spacing": []}  # 2D slices of 32x32: whole images
    assert record["sources"]["batch_size"] == "set" and record["sources"]["lr"] == "plan"

    # What the federation actually ran with.
    run_config = json.loads((out / "runs" / "fedbn-seed0" / "cell.json").read_text())["run_config"]
    assert (run_config["lr"], run_config["batch-size"]) == (1e-2, 2)
    assert json.loads(run_config["model"])["channels"] == [4, 8] and json.loads(run_config["model"])["norm"] == "batch"
    printed = capsys.readouterr().out
    assert "plan (2 site fingerprints" in printed and "batch 2 [set]" in printed and "lr 0.01 [plan] (pooled 0.001 [plan])" in printed
