"""The validation gate inside the real round loop: one bad reply per round, the run goes on.

The ServerApp's ``run_federation`` runs against an in-process Grid whose nodes
are our real ClientApp on real site folders; one site's train reply is
corrupted in a different way each round (what the issue lists). Each round must
reject exactly that reply, name the site and the reason, aggregate the others,
keep the global model finite and reach the last round.
"""

import json
import math

import numpy as np
import pytest
from flwr.app import Array

from server.checkpoint import CheckpointStore
from server.rounds import run_federation
from server.run_config import ServerRunConfig
from simulations.domain_shift import DEFAULT_PROFILES, generate_dataset
from tests.helpers import LocalGrid, set_task_identity

pytestmark = pytest.mark.slow

SITES = [p.name for p in DEFAULT_PROFILES[:3]]
BAD = SITES[1]


def _nan(arrays):
    key = next(k for k, a in arrays.items() if a.numpy().dtype.kind == "f")
    arrays[key] = Array(np.full(arrays[key].shape, np.nan, arrays[key].numpy().dtype))


def _broadcastable(arrays):
    key = next(k for k, a in arrays.items() if a.numpy().dtype.kind == "f" and len(a.shape) >= 2)
    arrays[key] = Array(np.ones((1,), arrays[key].numpy().dtype))


def _extra_key(arrays):
    arrays["extra.weight"] = Array(np.ones(2, np.float32))


def _dtype(arrays):
    key = next(k for k, a in arrays.items() if a.numpy().dtype == np.float32)
    arrays[key] = Array(arrays[key].numpy().astype(np.float64))


# round -> (corruption of the reply content, substring of the logged reason)
FAULTS = {
    1: (lambda c: _nan(c["arrays"]), "NaN"),
    2: (lambda c: _broadcastable(c["arrays"]), "shape (1,)"),
    3: (lambda c: _extra_key(c["arrays"]), "unexpected ['extra.weight']"),
    4: (lambda c: _dtype(c["arrays"]), "dtype float64"),
    5: (lambda c: c["config"].__setitem__("fingerprint", "0" * 16), "fingerprint"),
    6: (lambda c: c["metrics"].__setitem__("num-examples", 10**9), "implausible num-examples 1000000000"),
    7: (lambda c: c["metrics"].__setitem__("num-examples", -10), "must be positive"),
}


def _corrupt_bad_site(site, message_type, server_round, content):
    if message_type == "train" and site == BAD:
        FAULTS[server_round][0](content)


def test_each_bad_reply_is_rejected_named_and_the_run_goes_on(tmp_path):
    # Prepare
    set_task_identity()
    data = generate_dataset(tmp_path / "data", profiles=DEFAULT_PROFILES[:3], cases_per_site=6, size=(16, 16), num_classes=3)
    model = {"name": "unet", "spatial-dims": 2, "in-channels": 1, "out-channels": 3, "channels": [4, 8], "norm": "batch"}
    cfg = ServerRunConfig(model=json.dumps(model), run_name="gate", out_dir=str(tmp_path / "out"), num_rounds=len(FAULTS),
                          batch_size=4, eval_every=len(FAULTS), min_nodes=3, min_train_nodes=2, wait_seconds=5, round_timeout=30)
    # Execute
    result = run_federation(LocalGrid(SITES, data, tmp_path / "state", on_reply=_corrupt_bad_site), cfg)
    # Assert: every round rejected exactly the bad site, for the planted reason, and aggregated the others
    assert len(result.history) == len(FAULTS)
    for entry in result.history:
        _, reason = FAULTS[entry["round"]]
        assert list(entry["rejected"]) == [BAD], entry
        assert reason in entry["rejected"][BAD], (entry["round"], entry["rejected"][BAD])
        assert entry["train_sites"] == sorted(s for s in SITES if s != BAD)
        assert "skipped" not in entry
    # the global model stayed finite through every round
    store = CheckpointStore(tmp_path / "out" / "checkpoints", keep=3)
    ckpt = store.latest(run_name="gate", fingerprint=_fingerprint(model), policy="fedbn")
    assert ckpt.round == len(FAULTS)
    assert all(bool(np.isfinite(t.numpy()).all()) for t in ckpt.arrays.values())
    assert all(math.isfinite(v["dice"]) for v in result.per_site.values())
    # the status file the server exporter reads names the rejections
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["rejected_total"] == {BAD: len(FAULTS)} and status["round"] == len(FAULTS)


def _fingerprint(model):
    from shared_models import architecture_fingerprint, build_model

    return architecture_fingerprint(build_model(model, seed=0))
