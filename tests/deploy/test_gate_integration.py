"""The validation gate inside the real round loop: one bad reply per round, the run goes on.

The ServerApp's ``run_federation`` runs against an in-process Grid whose nodes
are our real ClientApp on real site folders; one site's train reply is
corrupted in a different way each round (what the issue lists). Each round must
reject exactly that reply, name the site and the reason, aggregate the others,
keep the global model finite and reach the last round. A second federation of
five sites has one send 100x its update every round: the norm bound names it
each round and the honest sites' Dice stays that of the run without it.
"""

import dataclasses
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


def _padding(arrays):
    """Padding arrays of twice the model's bytes (the catalogue's '2 GB of padding', scaled down)."""
    arrays["padding"] = Array(np.zeros(2 * arrays.count_bytes(), np.uint8))


def _pickled(arrays):
    """A float key whose bytes are a pickled object array (same declared dtype and shape)."""
    import io

    key = next(k for k, a in arrays.items() if a.dtype == "float32")
    payload = np.empty(1, dtype=object)
    payload[0] = {"not": "an array"}
    buffer = io.BytesIO()
    np.save(buffer, payload, allow_pickle=True)
    arrays[key] = Array(arrays[key].dtype, arrays[key].shape, arrays[key].stype, buffer.getvalue())


# round -> (corruption of the reply content, substring of the logged reason)
FAULTS = {
    1: (lambda c: _nan(c["arrays"]), "NaN"),
    2: (lambda c: _broadcastable(c["arrays"]), "shape (1,)"),
    3: (lambda c: _extra_key(c["arrays"]), "unexpected ['extra.weight']"),
    4: (lambda c: _dtype(c["arrays"]), "dtype float64"),
    5: (lambda c: c["config"].__setitem__("fingerprint", "0" * 16), "fingerprint"),
    6: (lambda c: c["metrics"].__setitem__("num-examples", 10**9), "implausible num-examples 1000000000"),
    7: (lambda c: c["metrics"].__setitem__("num-examples", -10), "must be positive"),
    8: (lambda c: _padding(c["arrays"]), "exceeds 1.5 x the shared model's"),
    9: (lambda c: _pickled(c["arrays"]), "not a plain numpy array"),
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


# ---------------------------------------------------------------- a scaled (Byzantine) update, 5 sites x 5 rounds (T-VAL-17)

FIVE = (*DEFAULT_PROFILES, dataclasses.replace(DEFAULT_PROFILES[0], name="site-e", gamma=1.3, scale=800.0))
ATTACKER = "site-e"


def _federate(tmp_path, name, on_reply=None, **overrides):
    """Five sites, five rounds of FedAvg/FedBN; the mean Dice of the four honest sites and the history."""
    set_task_identity()
    data = tmp_path / "data5"
    if not data.exists():
        generate_dataset(data, profiles=FIVE, cases_per_site=6, size=(16, 16), num_classes=3)
    model = {"name": "unet", "spatial-dims": 2, "in-channels": 1, "out-channels": 3, "channels": [4, 8], "norm": "batch"}
    cfg = ServerRunConfig(model=json.dumps(model), run_name=name, out_dir=str(tmp_path / name), num_rounds=5, batch_size=4,
                          eval_every=5, min_nodes=5, min_train_nodes=3, wait_seconds=5, round_timeout=30, **overrides)
    grid = LocalGrid([p.name for p in FIVE], data, tmp_path / f"state-{name}", on_reply=on_reply and (lambda *a: on_reply(grid, *a)))
    result = run_federation(grid, cfg)
    honest = [d for s, d in result.history[-1]["dice"].items() if s != ATTACKER]
    ckpt = CheckpointStore(tmp_path / name / "checkpoints").latest(run_name=name, fingerprint=_fingerprint(model), policy="fedbn")
    weights = np.concatenate([t.numpy().ravel() for t in ckpt.arrays.values() if t.is_floating_point()])
    return float(np.mean(honest)), result.history, weights


def _scale_100x(grid, site, message_type, server_round, content):
    """The attacker sends global + 100 x its update (``grid.sent[-1]`` is what it was sent)."""
    if message_type == "train" and site == ATTACKER:
        sent = grid.sent[-1].content["arrays"]
        for key, array in content["arrays"].items():
            new, old = array.numpy(), sent[key].numpy()
            if new.dtype.kind == "f":
                content["arrays"][key] = Array((old + 100 * (new - old)).astype(new.dtype))


def test_a_100x_update_is_rejected_every_round_and_the_global_dice_is_kept(tmp_path, caplog):
    # Execute: no attacker; the attacker with the gate; the attacker with the norm bound off
    clean, _, clean_w = _federate(tmp_path, "clean")
    with caplog.at_level("WARNING", logger="fedsite.server"):
        guarded, history, guarded_w = _federate(tmp_path, "guarded", _scale_100x)
    _, open_history, unguarded_w = _federate(tmp_path, "unguarded", _scale_100x, update_norm_bound=0.0)
    # Assert: the gate named the attacker in every round, in the history and in the log
    for entry in history:
        assert list(entry["rejected"]) == [ATTACKER] and "exceeds 10 x the round's median update norm" in entry["rejected"][ATTACKER]
        assert ATTACKER not in entry["train_sites"] and len(entry["train_sites"]) == 4
    assert sum(f"rejected the update of site {ATTACKER}: update norm" in r.getMessage() for r in caplog.records) == 5
    # the honest sites' global Dice within 1 Dice point of the run without an attacker
    assert abs(guarded - clean) <= 0.01, (clean, guarded)
    # without the bound the attacker is averaged in and drags the global model far from the clean one
    assert all(ATTACKER in e["train_sites"] for e in open_history)
    near, far = np.linalg.norm(guarded_w - clean_w), np.linalg.norm(unguarded_w - clean_w)
    print(f"clean Dice {clean:.4f}, guarded {guarded:.4f}; distance to the clean global: guarded {near:.4g}, unguarded {far:.4g}")
    assert far > 10 * near, (near, far)
