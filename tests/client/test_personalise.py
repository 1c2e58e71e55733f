"""Fine-tuning at the end of a federation: the site adapts every tensor, and none of it leaves the site."""

import json

import pytest
import torch

from client.predict import personalised_model
from client.site_state import PERSONAL_FILE, STATE_FILE
from server.checkpoint import CheckpointStore
from server.rounds import run_federation
from server.run_config import ServerRunConfig
from shared_models import architecture_fingerprint, build_model
from shared_models import protocol as P
from simulations.domain_shift import DEFAULT_PROFILES
from tests.helpers import TINY_UNET as MODEL, LocalGrid, two_site_data

pytestmark = pytest.mark.slow

SITES = [p.name for p in DEFAULT_PROFILES[:2]]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    _, data = two_site_data(root)
    replies = []
    grid = LocalGrid(SITES, data, root / "state", on_reply=lambda site, kind, rnd, content: replies.append((site, kind, rnd, content)))
    cfg = ServerRunConfig(model=json.dumps(MODEL), run_name="ft", out_dir=str(root / "out"), num_rounds=2, batch_size=4,
                          finetune_epochs=2, min_nodes=2, wait_seconds=5, round_timeout=60)
    result = run_federation(grid, cfg)
    return root, grid, replies, result


def _eval_configs(grid):
    return [(int(m.content["config"][P.SERVER_ROUND]), int(m.content["config"][P.FINETUNE_EPOCHS]))
            for m in grid.sent if m.metadata.message_type == "evaluate"]


def test_the_server_asks_for_fine_tuning_at_the_final_evaluation_only(federation):
    _, grid, _, _ = federation
    assert sorted(set(_eval_configs(grid))) == [(1, 0), (2, 2)]


def test_each_site_keeps_its_whole_fine_tuned_model_and_sends_only_metrics(federation):
    root, _, replies, result = federation
    fingerprint = architecture_fingerprint(build_model(MODEL, seed=0))
    store = CheckpointStore(root / "out" / "checkpoints", keep=3)
    global_arrays = store.latest(run_name="ft", fingerprint=fingerprint, policy="fedbn").arrays
    for site in SITES:
        personal = torch.load(root / "state" / site / "ft" / PERSONAL_FILE, weights_only=False)
        local = torch.load(root / "state" / site / "ft" / STATE_FILE, weights_only=False)
        model_keys = set(build_model(MODEL, seed=0).state_dict())
        assert set(personal["tensors"]) == model_keys
        assert set(local["tensors"]) < model_keys  # the federation's own site state is untouched: norm tensors only
        # fine-tuning moved the shared weights away from the federation's global model, at the site only
        moved = [k for k, a in global_arrays.items() if not torch.equal(personal["tensors"][k], torch.from_numpy(a.numpy()))]
        assert moved
    for site, kind, rnd, content in replies:
        if kind == "evaluate":
            assert P.ARRAYS not in content, (site, rnd)
    assert set(result.per_site) == set(SITES)


def test_predict_loads_the_fine_tuned_model(federation):
    root, _, _, _ = federation
    site = SITES[0]
    model, _ = personalised_model(root / "state" / site, site, "ft")
    stored = torch.load(root / "state" / site / "ft" / PERSONAL_FILE, weights_only=False)["tensors"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, stored[key]), key
