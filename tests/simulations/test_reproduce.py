"""`fedsite reproduce`: the retrained discretised UXNet, params/MACs per row, one code version, generated claims."""

import argparse
import json
from dataclasses import replace

import pytest
import torch
import yaml

from shared_models.build import build_model
from shared_models.complexity import count_macs, count_parameters
from shared_models.nets.uxnet import DecoderNode, SearchBlock
from shared_models.nets.uxnet_search import derive_architecture
from simulations import reproduce
from simulations.claims import claim_lines, verdict
from simulations.experiment import ExperimentConfig, load_experiment
from simulations.model_costs import arm_costs
from simulations.results_page import CodeVersionMismatch, code_version, results_table
from simulations.retrain import agreed_architecture, retrain_config, write_config

SPEC = {"name": "uxnet", "channels": [4, 8], "spatial-dims": 2, "in-channels": 1, "out-channels": 3}
MODELS_YAML = """
# Tiny models experiment.
name: tiny-models
data:
  synthetic: {sites: 2, cases-per-site: 8, spatial-dims: 2, size: [32, 32], num-classes: 3, seed: 0}
model: {name: unet, channels: [4, 8], norm: batch}
methods: []
arms:
  - {name: unet-fedbn, method: fedbn}
  - name: uxnet-search-fedbn
    method: fedbn
    model: {name: uxnet, search: false, arch-lr: 0.01}
    model-schedule: {2: {search: true}}
seeds: [0, 1]
rounds: 2
batch-size: 4
device: cpu
"""


def _arch(op_shift: int, beta_shift: int) -> dict:
    """A real discretised architecture of SPEC: op ``op_shift`` wins every block, inputs ranked by ``beta_shift``."""
    model = build_model(SPEC, seed=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SearchBlock):
                m.alpha.zero_()
                m.alpha[op_shift % len(m.alpha)] = 3.0
            if isinstance(m, DecoderNode):
                m.beta.copy_(torch.arange(len(m.beta), dtype=torch.float32).roll(beta_shift) * (1 + 0.1 * op_shift))
    return derive_architecture(model)


def _report(archs_by_seed: dict[int, dict]) -> dict:
    return {"experiment": "tiny-models", "runs": [
        {"run": f"uxnet-search-fedbn-seed{s}", "method": "uxnet-search-fedbn", "seed": s, "model": SPEC,
         "architectures": {"federation": {"arch": a}}} for s, a in archs_by_seed.items()]}


def _config(tmp_path) -> ExperimentConfig:
    path = tmp_path / "models.yaml"
    path.write_text(MODELS_YAML)
    return load_experiment(path)


def test_retrain_config_takes_the_architecture_the_seeds_agree_on(tmp_path):
    a0 = _arch(1, 0)
    a1 = {"ops": dict(a0["ops"]), "inputs": {n: {s: w * 0.5 + 0.25 for s, w in v.items()} for n, v in a0["inputs"].items()}}
    cfg = _config(tmp_path)
    derived, [choice] = retrain_config(cfg, _report({1: a1, 0: a0}))
    assert choice.agreed and choice.seeds == (0, 1) and "agree" in choice.note
    assert choice.arch["ops"] == a0["ops"]
    for node, weights in a0["inputs"].items():
        assert list(choice.arch["inputs"][node]) == list(weights)
        for src, w in weights.items():
            assert choice.arch["inputs"][node][src] == pytest.approx((w + a1["inputs"][node][src]) / 2)
    [arm] = derived.arms
    assert arm.name == "uxnet-discretised-fedbn" and arm.method == "fedbn" and arm.model_schedule == {}
    assert arm.model == {"name": "uxnet", "fixed-arch": choice.arch}  # no search keys of the supernet
    assert (derived.methods, derived.seeds, derived.rounds, derived.data) == ((), cfg.seeds, cfg.rounds, cfg.data)
    assert derived.name == "tiny-models-retrain"
    # The derived YAML is an ordinary experiment file that reads back unchanged and builds the fixed network.
    assert load_experiment(write_config(derived, tmp_path / "models-retrain.yaml")) == derived
    [cell, _] = derived.cells()
    built = build_model({**cell.model, "spatial-dims": 2, "in-channels": 1, "out-channels": 3})
    assert not built.is_supernet and built.config.fixed_arch == choice.arch


def test_retrain_takes_seed_0s_architecture_when_the_seeds_disagree(tmp_path):
    a0, a1 = _arch(1, 0), _arch(2, 1)
    assert a0["ops"] != a1["ops"]
    choice = agreed_architecture(_report({1: a1, 0: a0}), "uxnet-search-fedbn")
    assert not choice.agreed and choice.arch == a0 and "seed 0's" in choice.note and "disagree" in choice.note
    with pytest.raises(ValueError, match="no architecture"):
        agreed_architecture(_report({}), "uxnet-search-fedbn")


def test_claims_hold_only_when_the_interval_excludes_0_on_the_better_side():
    rows = [
        {"a": "fedbn", "b": "local", "diff": 0.03, "ci95": [0.01, 0.05], "p": 0.02, "n": 8},
        {"a": "fedbn", "b": "fedavg", "diff": 0.01, "ci95": [-0.02, 0.03], "p": 0.4, "n": 8},
        {"a": "fedavg", "b": "local", "diff": -0.04, "ci95": [-0.06, -0.01], "p": 0.01, "n": 8},
        {"a": "silobn", "b": "local", "diff": 0.02, "ci95": None, "p": float("nan"), "n": 4},
        {"a": "fedprox", "b": "fedavg", "diff": 0.0, "ci95": [0.0, 0.02], "p": 0.5, "n": 8},
    ]
    assert [verdict(r) for r in rows] == ["holds", "does not hold", "does not hold", "does not hold", "does not hold"]
    lines = claim_lines(rows)
    assert lines[0] == "- fedbn vs local (expected better): diff +0.030 [+0.010, +0.050], p 0.02: **holds**"
    assert lines[2].startswith("- fedavg vs local") and lines[2].endswith("**does not hold**") and "[-0.060, -0.010]" in lines[2]
    assert "no interval" in lines[3] and "p n/a" in lines[3]


def _run(method, model, seed=0):
    return {"method": method, "model": model, "seed": seed, "mean_dice": 0.5, "wall_s": 1.0,
            "per_site": {"site-a": {"dice": 0.5}, "site-b": {"dice": 0.5}}}


def _summary(methods):
    return {m: {"per_site": {"site-a": 0.5, "site-b": 0.5}, "mean_dice": 0.5, "std": 0.0, "seeds": [0]} for m in methods}


def test_params_and_macs_columns_are_the_networks_as_built(tmp_path):
    cfg = _config(tmp_path)
    cfg = replace(cfg, arms=(*cfg.arms, replace(cfg.arms[0], name="dual", model={"name": "dualnorm_unet", "stage": "baseline"},
                                                model_schedule={2: {"stage": "dual"}})))
    fixed = {**SPEC, "fixed-arch": _arch(1, 0)}
    dims = {"spatial-dims": 2, "in-channels": 1, "out-channels": 3}
    specs = {c.label: {**c.model, **dims} for c in cfg.cells()}
    results = {"sites": ["site-a", "site-b"], "runs": [_run(m, s) for m, s in specs.items()] + [_run("uxnet-discretised-fedbn", fixed)],
               "summary": _summary([*specs, "uxnet-discretised-fedbn"])}
    costs = arm_costs(cfg, results)
    table = results_table(results, costs)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    assert set(rows) == {"unet-fedbn", "uxnet-search-fedbn (supernet)", "dual", "uxnet-discretised-fedbn (discretised, retrained from scratch)"}
    expected = {"unet-fedbn": specs["unet-fedbn"], "uxnet-search-fedbn (supernet)": {**specs["uxnet-search-fedbn"], "search": True},
                "dual": {**specs["dual"], "stage": "dual"}, "uxnet-discretised-fedbn (discretised, retrained from scratch)": fixed}
    for row, spec in expected.items():
        model = build_model(spec, seed=0)
        assert rows[row][-2:] == [f"{count_parameters(model):,}", f"{count_macs(model, (1, 1, 32, 32)):,} |"], row
    assert table.splitlines()[0].endswith("| params | MACs (per input) |")
    assert rows["uxnet-search-fedbn (supernet)"][-2] != rows["uxnet-discretised-fedbn (discretised, retrained from scratch)"][-2]


def test_one_code_version_per_page():
    assert code_version({"a": {"code_version": "v1"}, "b": {"code_version": "v1"}}) == "v1"
    with pytest.raises(CodeVersionMismatch, match="fl_baselines ran on code version v1, models on v2"):
        code_version({"fl_baselines": {"code_version": "v1"}, "models": {"code_version": "v2"}})


def _fake_simulate(versions: dict[str, str]):
    """A `fedsite simulate` that writes the results.json (and architectures.json) a real run would, instantly."""
    def run(args: argparse.Namespace) -> int:
        cfg = load_experiment(args.config)
        dims = {"spatial-dims": 2, "in-channels": 1, "out-channels": 3}
        runs = [{**_run(c.label, {**c.model, **dims}, c.seed), "mean_dice": 0.4 + 0.1 * i}
                for i, c in enumerate(cfg.cells())]
        results = {"experiment": cfg.name, "code_version": versions.get(args.out.name, "v1"), "sites": ["site-a", "site-b"],
                   "runs": runs, "summary": _summary(dict.fromkeys(r["method"] for r in runs)),
                   "comparisons": [{"a": "fedbn", "b": "local", "diff": 0.03, "ci95": [0.01, 0.05], "p": 0.02, "n": 4}]}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results))
        (args.out / "architectures.json").write_text(json.dumps(_report({0: _arch(1, 0), 1: _arch(1, 0)})))
        return 0
    return run


def _reproduce(tmp_path, monkeypatch, versions):
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "models.yaml").write_text(MODELS_YAML)
    (tmp_path / "configs" / "fl_baselines.yaml").write_text(MODELS_YAML.replace("tiny-models", "tiny-fl"))
    monkeypatch.setattr(reproduce.simulate, "run", _fake_simulate(versions))
    parser = argparse.ArgumentParser()
    reproduce.add_arguments(parser)
    page = tmp_path / "RESULTS.md"
    args = ["--configs", str(tmp_path / "configs"), "--only", "fl_baselines,models", "--out", str(tmp_path / "out"), "--results", str(page)]
    return reproduce.run(parser.parse_args(args)), page


def test_page_names_its_code_version_and_shows_the_retrained_row(tmp_path, monkeypatch):
    code, page = _reproduce(tmp_path, monkeypatch, {})
    assert code == 0
    text = page.read_text()
    assert "Code version `v1`" in text
    retrain_yaml = tmp_path / "out" / "models-retrain.yaml"
    derived = yaml.safe_load(retrain_yaml.read_text())
    assert [a["name"] for a in derived["arms"]] == ["uxnet-discretised-fedbn"]
    assert derived["arms"][0]["model"]["fixed-arch"]["ops"] == _arch(1, 0)["ops"]
    assert "| uxnet-search-fedbn (supernet) |" in text and "| uxnet-discretised-fedbn (discretised, retrained from scratch) |" in text
    assert "retrains the architecture the seeds [0, 1] of `uxnet-search-fedbn` agree on" in text
    assert f"--config {retrain_yaml}" in text
    assert "- fedbn vs local (expected better): diff +0.030 [+0.010, +0.050], p 0.02: **holds**" in text


def test_experiments_of_different_code_versions_are_refused(tmp_path, monkeypatch, capsys):
    code, page = _reproduce(tmp_path, monkeypatch, {"models": "v2"})
    assert code == 1 and not page.exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fl_baselines ran on code version v1, models on v2" in err


def test_retrain_is_an_ordinary_simulate_experiment_reused_under_the_cell_identity(tmp_path, monkeypatch):
    """One tiny real federation: the derived experiment runs, is reused as is, and reruns for another architecture."""
    import simulations.engine

    cfg = replace(_config(tmp_path), seeds=(0,), rounds=1)
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "architectures.json").write_text(json.dumps(_report({0: _arch(1, 0)})))
    name, derived, retrained = reproduce.retrain_experiment(cfg, "models", out)
    [run] = retrained.results["runs"]
    assert name == "models-retrain" and run["method"] == "uxnet-discretised-fedbn"
    assert run["model"]["fixed-arch"] == _arch(1, 0) and set(run["per_site"]) == {"site-a", "site-b"}
    assert (out / "models-retrain" / "runs" / "uxnet-discretised-fedbn-seed0" / "cell.json").exists()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(simulations.engine, "run_simulated_federation", must_not_run)
    assert reproduce.retrain_experiment(cfg, "models", out)[2].results["runs"] == [run]
    (out / "models" / "architectures.json").write_text(json.dumps(_report({0: _arch(2, 1)})))
    with pytest.raises(reproduce.ReproduceError, match="models-retrain failed"):
        reproduce.retrain_experiment(cfg, "models", out)
