"""The UXNet architecture report reads real checkpoints/site stores and reports what was found."""

import json

import torch

from client.site_state import SiteStateStore
from server.checkpoint import CheckpointStore, ServerCheckpoint
from shared_models import architecture_fingerprint, build_model, partition
from shared_models.nets.uxnet import DecoderNode, SearchBlock
from shared_models.nets.uxnet_search import derive_architecture
from shared_models.partition import Policy
from simulations.arch_report import FEDERATION, write_arch_report
from tests.helpers import write_federation_json

SPEC = {"name": "uxnet", "channels": [4, 8, 16], "spatial-dims": 2, "in-channels": 1, "out-channels": 2}
SITES = ["site-a", "site-b"]


def _set_arch(model, shift):
    """alpha: op (shift mod n) wins; beta: the last (shifted) source wins."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SearchBlock):
                m.alpha.zero_()
                m.alpha[shift % len(m.alpha)] = 3.0
            if isinstance(m, DecoderNode):
                m.beta.copy_(torch.arange(len(m.beta), dtype=torch.float32).roll(shift))


def _write_run(out, run_name, policy_name, site_shift):
    cell = out / "runs" / run_name
    model = build_model(SPEC, seed=0)
    fingerprint, policy = architecture_fingerprint(model), Policy.parse(policy_name)
    split = partition(model, policy)
    _set_arch(model, 2)  # the global model's architecture
    state = model.state_dict()
    CheckpointStore(cell / "checkpoints").save(ServerCheckpoint(1, run_name, fingerprint, policy.name, {k: state[k].clone() for k in split.shared}))
    _set_arch(model, 0)
    CheckpointStore(cell / "checkpoints").save(
        ServerCheckpoint(5, run_name, fingerprint, policy.name, {k: v.clone() for k, v in model.state_dict().items() if k in split.shared})
    )
    expected = {FEDERATION: derive_architecture(model)}
    for site, shift in zip(SITES, site_shift):
        _set_arch(model, shift)
        expected[site] = derive_architecture(model)
        local = {k: v.clone() for k, v in model.state_dict().items() if k in split.local}
        SiteStateStore(cell / "site-state" / site, run_name, site).save(local, fingerprint=fingerprint, policy=policy.name, round_=5)
    write_federation_json(cell, run_name, policy.name, SPEC, SITES)
    return expected


def test_federation_and_per_site_architectures(tmp_path):
    fed = _write_run(tmp_path, "ux-seed0", "fedbn", (1, 3))
    loc = _write_run(tmp_path, "local-seed0", "local", (1, 3))
    results = {
        "experiment": "tiny",
        "sites": SITES,
        "runs": [
            {"method": "ux", "model": SPEC, "seed": 0, "mean_dice": 0.5},
            {"method": "local", "model": SPEC, "seed": 0},
            {"method": "unet", "model": {"name": "unet", "channels": [4, 8]}, "seed": 0},  # ignored
        ],
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    paths = write_arch_report(tmp_path)
    assert [p.name for p in paths] == ["architectures.json", "architectures.md"]
    report = json.loads(paths[0].read_text())
    by_run = {r["run"]: r for r in report["runs"]}
    assert set(by_run) == {"ux-seed0", "local-seed0"}

    ux = by_run["ux-seed0"]
    assert ux["round"] == 5 and not ux["arch_local"] and ux["loaded_site"] == "site-a"
    assert list(ux["architectures"]) == [FEDERATION]  # fedbn: alpha/beta shared, site norms do not matter
    assert ux["architectures"][FEDERATION]["arch"] == json.loads(json.dumps(fed[FEDERATION]))
    assert set(ux["architectures"][FEDERATION]["arch"]["ops"].values()) == {"conv3"}

    local = by_run["local-seed0"]
    assert local["arch_local"] and list(local["architectures"]) == SITES
    for site in SITES:
        assert local["architectures"][site]["arch"] == json.loads(json.dumps(loc[site]))
    assert local["architectures"]["site-a"]["arch"] != local["architectures"]["site-b"]["arch"]

    md = paths[1].read_text()
    assert "## ux-seed0 (policy fedbn, round 5, mean Dice 0.5000)" in md
    assert "### site site-b" in md and "| encoder.0.blocks.0 | conv3 |" in md
    # the discretised net can be rebuilt from the reported arch
    build_model({**SPEC, "fixed-arch": ux["architectures"][FEDERATION]["arch"]})


def test_missing_checkpoint_skips_the_run(tmp_path, capsys):
    (tmp_path / "runs" / "ux-seed0").mkdir(parents=True)
    (tmp_path / "runs" / "ux-seed0" / "federation.json").write_text(json.dumps({"policy": "fedbn"}))
    report = write_arch_report(tmp_path, {"sites": SITES, "runs": [{"method": "ux", "model": SPEC, "seed": 0}]})
    assert json.loads(report[0].read_text())["runs"] == []
    assert "ux-seed0 skipped" in capsys.readouterr().err
    assert "No uxnet run found" in report[1].read_text()
