"""Ditto: each site trains a personal model beside the federated one; it never travels and never changes the federation."""

import json

import pytest
import torch

from client.ditto import PERSONAL_OPTIMIZER_FILE
from client.predict import personalised_model
from client.site_state import PERSONAL_FILE, STATE_FILE
from server.checkpoint import CheckpointStore
from server.rounds import run_federation
from server.run_config import ServerRunConfig
from shared_models import architecture_fingerprint, build_model
from shared_models import protocol as P
from simulations.domain_shift import DEFAULT_PROFILES
from tests.helpers import TINY_UNET as MODEL, LocalGrid, two_site_data

SITES = [p.name for p in DEFAULT_PROFILES[:2]]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federations(tmp_path_factory):
    root = tmp_path_factory.mktemp("ditto")
    _, data = two_site_data(root)
    out = {}
    arms = (("fedbn", "fedbn", 0.0), ("ditto", "fedbn", 0.1), ("local", "local", 0.0), ("ditto-vanishing", "fedbn", 1e-12))
    for name, policy, mu in arms:
        replies = []
        grid = LocalGrid(SITES, data, root / name / "state", on_reply=lambda s, kind, rnd, content, r=replies: r.append((kind, content)))
        cfg = ServerRunConfig(model=json.dumps(MODEL), run_name=name, out_dir=str(root / name / "out"), num_rounds=2, batch_size=4,
                              policy=policy, personal_mu=mu, min_nodes=2, wait_seconds=5, round_timeout=60)
        out[name] = (run_federation(grid, cfg), replies, root / name)
    return out


def _global(folder, name):
    fingerprint = architecture_fingerprint(build_model(MODEL, seed=0))
    return CheckpointStore(folder / "out" / "checkpoints", keep=3).latest(run_name=name, fingerprint=fingerprint, policy="fedbn").arrays


def test_the_federated_model_is_fedbns_bit_for_bit(federations):
    ditto, fedbn = _global(federations["ditto"][2], "ditto"), _global(federations["fedbn"][2], "fedbn")
    assert set(ditto) == set(fedbn)
    for key in ditto:
        assert torch.equal(torch.from_numpy(ditto[key].numpy()), torch.from_numpy(fedbn[key].numpy())), key


def test_sites_are_scored_with_personal_models_that_stay_at_the_site(federations):
    result, replies, folder = federations["ditto"]
    assert result.per_site and result.per_site != federations["fedbn"][0].per_site
    sent = [set(c[P.ARRAYS]) for kind, c in replies if kind == "train"]
    assert len(sent) == 2 * len(SITES) and all(keys == sent[0] for keys in sent)  # the shared tensors, as FedBN's
    assert not any(P.ARRAYS in c for kind, c in replies if kind == "evaluate")
    for site in SITES:
        run_dir = folder / "state" / site / "ditto"
        personal = torch.load(run_dir / PERSONAL_FILE, weights_only=False)
        assert personal["round"] == 2 and set(personal["tensors"]) == set(build_model(MODEL, seed=0).state_dict())
        optimizer = torch.load(run_dir / PERSONAL_OPTIMIZER_FILE, weights_only=False)
        steps = {float(s["step"]) for s in optimizer["optimizer_state"]["state"].values()}
        assert steps == {2.0 * 1}  # 2 rounds x 1 batch of the 4 training cases: the optimizer continued across rounds
        model, _ = personalised_model(folder / "state" / site, site, "ditto")  # what `fedsite predict` deploys
        assert all(torch.equal(v, personal["tensors"][k]) for k, v in model.state_dict().items())


def test_a_vanishing_pull_gives_the_local_methods_model(federations):
    """mu -> 0 is local training: same start, same draws, same optimizer; the arms differ by the pull alone."""
    for site in SITES:
        local = torch.load(federations["local"][2] / "state" / site / "local" / STATE_FILE, weights_only=False)["tensors"]
        personal = torch.load(federations["ditto-vanishing"][2] / "state" / site / "ditto-vanishing" / PERSONAL_FILE,
                              weights_only=False)["tensors"]
        assert set(personal) == set(local)
        for key, value in local.items():
            torch.testing.assert_close(personal[key], value, rtol=1e-5, atol=1e-6, msg=f"{site} {key}")
    scores = {name: {site: v["dice"] for site, v in federations[name][0].per_site.items()} for name in ("local", "ditto-vanishing")}
    assert scores["ditto-vanishing"] == pytest.approx(scores["local"], abs=1e-4)
