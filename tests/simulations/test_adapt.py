"""simulations.adapt: a never-trained site's model from a (tiny, fake but real-format) finished federation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from client.site_state import SiteStateStore
from server.checkpoint import CheckpointStore, ServerCheckpoint
from shared_models import architecture_fingerprint, build_model, partition
from shared_models.norms.registry import TensorRole
from shared_models.norms.switchable import SwitchNorm
from tests.helpers import write_federation_json
from client.adapt import load_new_site
from simulations.adapt import AdaptError, adapt_and_score, adapt_models, average_model, load_finished_run
from simulations.cli import main
from simulations.domain_shift import DEFAULT_PROFILES, generate_dataset

BN_SPEC = {"name": "unet", "spatial-dims": 2, "in-channels": 1, "out-channels": 3, "channels": [4, 8], "norm": "batch"}
SN_SPEC = {**BN_SPEC, "norm": "switchable"}
SITES = ("a", "b")


def _randomized(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The model's state with every tensor drawn anew (variances positive, counters integer)."""
    out = {}
    for key, value in model.state_dict().items():
        if not value.dtype.is_floating_point:
            out[key] = torch.randint(1, 20, value.shape, generator=generator, dtype=value.dtype)
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            out[key] = torch.randn(value.shape, generator=generator) * 0.3
    return out


def make_finished_run(root, spec=BN_SPEC, policy="fedbn", method="fedbn", seed=0):
    """OUT/runs/<method>-seed<k> with federation.json, a checkpoint and one site state per training site."""
    run_name = f"{method}-seed{seed}"
    cell = root / "runs" / run_name
    model = build_model(spec, seed=seed)
    fingerprint = architecture_fingerprint(model)
    split = partition(model, policy)
    g = torch.Generator().manual_seed(123)
    shared = {k: v for k, v in _randomized(model, g).items() if k in split.shared}
    CheckpointStore(cell / "checkpoints").save(ServerCheckpoint(2, run_name, fingerprint, policy, shared, {}, []))
    local = {}
    for site in SITES:
        local[site] = {k: v for k, v in _randomized(model, g).items() if k in split.local}
        if split.local:
            SiteStateStore(cell / "site-state" / site, run_name, site).save(local[site], fingerprint=fingerprint, policy=policy, round_=2)
    write_federation_json(cell, run_name, policy, spec, list(SITES), seed=seed)
    return cell, shared, local


@pytest.fixture(scope="module")
def new_site(tmp_path_factory):
    out = generate_dataset(tmp_path_factory.mktemp("new"), profiles=(DEFAULT_PROFILES[1],), cases_per_site=4, size=(16, 16), num_classes=3, seed=5)
    return out / DEFAULT_PROFILES[1].name


def _first_norm_input(model, images):
    """Input of the first norm layer (inc.norm0): the stem conv, before any normalization."""
    with torch.no_grad():
        return model.stem(images)


def test_average_is_the_mean_of_the_sites_local_tensors(tmp_path):
    cell, shared, local = make_finished_run(tmp_path)
    run = load_finished_run(cell, SITES)  # model spec from the cell's run config
    assert run.policy == "fedbn" and run.round == 2 and set(run.local) == set(SITES)
    state = average_model(run).state_dict()
    for key, value in shared.items():
        assert torch.equal(state[key], value), key
    assert local["a"]
    for key in local["a"]:
        a, b = local["a"][key], local["b"][key]
        if a.dtype.is_floating_point:
            torch.testing.assert_close(state[key], (a + b) / 2)
        else:  # integer buffers: the mean, rounded
            assert state[key].dtype == a.dtype
            assert torch.equal(state[key], ((a.double() + b.double()) / 2).round().to(a.dtype)), key


def test_adabn_changes_only_statistics_and_matches_feature_moments(tmp_path, new_site):
    cell, _, _ = make_finished_run(tmp_path)
    run = load_finished_run(cell, SITES, model_spec=BN_SPEC, seed=0)
    site = load_new_site(new_site)
    assert len(site.images) == 4
    models = adapt_models(run, site, ["average", "adabn"], batch_size=2)
    base, adapted = models["average"][0], models["adabn"][0]
    roles = partition(base, "fedbn").roles
    before, after = base.state_dict(), adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(roles[k] == TensorRole.STATISTIC for k in changed), changed
    running = {k for k, r in roles.items() if r == TensorRole.STATISTIC and not k.endswith("num_batches_tracked")}
    assert running <= changed  # every BN layer re-estimated

    feats = _first_norm_input(base, site.images)  # 2 equal batches of 2: mean of batch means = overall mean
    torch.testing.assert_close(after["inc.norm0.running_mean"], feats.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    batch_vars = [f.var(dim=(0, 2, 3), unbiased=True) for f in feats.split(2)]
    torch.testing.assert_close(after["inc.norm0.running_var"], sum(batch_vars) / 2, rtol=1e-4, atol=1e-5)
    assert int(after["inc.norm0.num_batches_tracked"]) == 2
    assert models["adabn"][1]["changed_tensors"] == len(changed)


def test_sn_batch_average_for_switchable_model(tmp_path, new_site):
    cell, _, _ = make_finished_run(tmp_path, spec=SN_SPEC)
    run = load_finished_run(cell, SITES)
    site = load_new_site(new_site)
    models = adapt_models(run, site, ["average", "adabn", "sn-batch-average"], batch_size=2)
    assert models["adabn"][0] is None and "BatchNorm" in models["adabn"][1]["skipped"]
    base, adapted = models["average"][0], models["sn-batch-average"][0]
    assert models["sn-batch-average"][1]["sn_layers"] == sum(isinstance(m, SwitchNorm) for m in base.modules())
    roles = partition(base, "fedbn").roles
    before, after = base.state_dict(), adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(roles[k] == TensorRole.STATISTIC for k in changed)
    feats = _first_norm_input(base, site.images)
    torch.testing.assert_close(after["inc.norm0.running_mean"], feats.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_adapt_and_score_labelled_and_unlabelled(tmp_path, new_site):
    cell, _, _ = make_finished_run(tmp_path)
    scores = adapt_and_score(cell, SITES, new_site, batch_size=2, save_dir=tmp_path / "models")
    assert set(scores) == {"average", "adabn", "sn-batch-average"}
    for option in ("average", "adabn"):
        assert 0.0 <= scores[option]["dice"] <= 1.0 and scores[option]["n"] == 4
        assert (tmp_path / "models" / f"{option}.pt").is_file()
    assert scores["sn-batch-average"]["dice"] is None and "Switchable" in scores["sn-batch-average"]["skipped"]
    assert scores["adabn"]["changed_tensors"] > 0

    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(new_site / "images", unlabelled / "images")
    scores = adapt_and_score(cell, SITES, unlabelled, ["average", "adabn"], batch_size=2)
    assert scores["adabn"]["dice"] is None and scores["adabn"]["n"] == 0 and scores["adabn"]["n_images"] == 4
    assert scores["adabn"]["changed_tensors"] > 0  # adapted on images alone


def test_fedavg_run_needs_no_site_state(tmp_path, new_site):
    cell, shared, _ = make_finished_run(tmp_path, policy="fedavg", method="fedavg")
    assert not (cell / "site-state").exists()
    scores = adapt_and_score(cell, SITES, new_site, ["average", "adabn"], batch_size=4)
    assert scores["average"]["dice"] is not None and scores["adabn"]["changed_tensors"] > 0


def test_cli(tmp_path, new_site, capsys):
    cell, _, _ = make_finished_run(tmp_path)
    out = tmp_path / "adapt.json"
    rc = main(["adapt", "--run", str(cell), "--train-sites", "a,b", "--site-dir", str(new_site), "--options", "average,adabn",
               "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert set(payload["options"]) == {"average", "adabn"} and payload["options"]["adabn"]["n"] == 4
    assert "adabn" in capsys.readouterr().out
    assert main(["adapt", "--run", str(cell), "--site-dir", str(new_site), "--options", "average", "--batch-size", "2"]) == 0  # sites from federation.json


def test_errors_name_files(tmp_path, new_site):
    cell, _, _ = make_finished_run(tmp_path)
    with pytest.raises(AdaptError, match=r"site-state/c/fedbn-seed0/local_state.pt"):
        load_finished_run(cell, ["a", "c"])
    with pytest.raises(AdaptError, match="federation.json"):
        load_finished_run(tmp_path / "runs" / "nope-seed0", SITES)
    with pytest.raises(ValueError, match="unknown adaptation option"):
        adapt_and_score(cell, SITES, new_site, ["tent"])
    other = tmp_path / "other"
    make_finished_run(other, spec={**BN_SPEC, "channels": [4, 16]})
    with pytest.raises(AdaptError, match="round-0002.pt"):  # the spec given does not match the stored run
        load_finished_run(other / "runs" / "fedbn-seed0", SITES, model_spec=BN_SPEC)
    assert main(["adapt", "--run", str(cell), "--train-sites", "a,c", "--site-dir", str(new_site)]) == 2
