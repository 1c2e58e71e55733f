"""The Switchable Norm report reads real site stores and checkpoints and reports softmax(lambda) per site."""

import json

import pytest
import torch

from tests.helpers import write_federation_json

from client.site_state import SiteStateStore
from server.checkpoint import CheckpointStore, ServerCheckpoint
from shared_models import architecture_fingerprint, build_model, partition
from shared_models.partition import Policy
from simulations.sn_report import uses_switchable, write_sn_report

SPEC = {"name": "unet", "channels": [4, 8], "norm": "switchable", "spatial-dims": 2, "in-channels": 1, "out-channels": 2}
LAMBDAS = {  # per site: (mean_weight, var_weight) given to every SN layer, shifted per layer
    "site-a": ([3.0, 0.0, -1.0], [0.0, 2.0, 0.0]),
    "site-b": ([-1.0, 0.5, 2.5], [1.0, -2.0, 0.3]),
}


def _fake_output(out):
    """One fedbn (mixing local) run on 2 sites, written with the real stores."""
    run_name = "sn-fedbn-seed0"
    cell = out / "runs" / run_name
    model = build_model(SPEC, seed=0)
    fingerprint = architecture_fingerprint(model)
    policy = Policy.parse("fedbn", {"mixing": "local"})
    split = partition(model, policy)
    state = model.state_dict()
    CheckpointStore(cell / "checkpoints").save(
        ServerCheckpoint(3, run_name, fingerprint, policy.name, {k: state[k].clone() for k in split.shared})
    )
    expected = {}
    layers = [k[: -len(".mean_weight")] for k in state if k.endswith(".mean_weight")]
    assert len(layers) >= 4
    for site, (mean_l, var_l) in LAMBDAS.items():
        local = {k: state[k].clone() for k in split.local}
        expected[site] = {}
        for i, layer in enumerate(layers):
            lm, lv = torch.tensor(mean_l) + 0.1 * i, torch.tensor(var_l) - 0.2 * i * torch.tensor([1.0, 0.0, 0.0])
            local[f"{layer}.mean_weight"], local[f"{layer}.var_weight"] = lm, lv
            expected[site][layer] = {"mean": torch.softmax(lm, 0).tolist(), "var": torch.softmax(lv, 0).tolist()}
        SiteStateStore(cell / "site-state" / site, run_name, site).save(local, fingerprint=fingerprint, policy=policy.name, round_=3)
    write_federation_json(cell, run_name, "fedbn", SPEC, list(LAMBDAS), overrides={"mixing": "local"})
    results = {
        "experiment": "tiny",
        "sites": list(LAMBDAS),
        "runs": [{"method": "sn-fedbn", "federated_method": "fedbn", "model": SPEC, "seed": 0},
                 {"method": "bn-fedavg", "federated_method": "fedavg", "model": {**SPEC, "norm": "batch"}, "seed": 0}],
    }
    (out / "results.json").write_text(json.dumps(results))
    return expected


def test_per_site_weights_are_the_softmax_of_each_sites_lambda(tmp_path):
    expected = _fake_output(tmp_path)
    paths = write_sn_report(tmp_path)
    assert [p.name for p in paths] == ["sn_weights.json", "sn_weights.md", "sn_weights.png"]

    report = json.loads((tmp_path / "sn_weights.json").read_text())
    assert list(report["arms"]) == ["sn-fedbn"]  # the BatchNorm run is not analysed
    arm = report["arms"]["sn-fedbn"]
    assert arm["local_mixing"] is True and arm["sites"] == ["site-a", "site-b"]
    assert arm["layers"] == list(expected["site-a"])
    for site, layers in expected.items():
        for layer, want in layers.items():
            for stat in ("mean", "var"):
                assert arm["per_run"]["seed0"][site][layer][stat] == pytest.approx(want[stat], abs=1e-6)
                assert arm["summary"][site][layer][stat]["avg"] == pytest.approx(want[stat], abs=1e-6)
                assert arm["summary"][site][layer][stat]["std"] == [0.0, 0.0, 0.0]
    first = arm["layers"][0]
    a, b = expected["site-a"][first]["mean"], expected["site-b"][first]["mean"]
    assert arm["site_spread"][first]["mean"] == pytest.approx(max(abs(x - y) for x, y in zip(a, b)), abs=1e-6)

    md = (tmp_path / "sn_weights.md").read_text()
    assert "| layer | site-a | site-b | spread |" in md and f"| {first} |" in md
    png = (tmp_path / "sn_weights.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"


def test_uses_switchable_finds_nested_specs():
    assert uses_switchable({"name": "unet", "norm": "switchable"})
    assert uses_switchable({"name": "x", "backbone": {"norm": "switchable"}})
    assert not uses_switchable({"name": "unet", "norm": "batch"})
