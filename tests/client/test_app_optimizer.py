"""The real ClientApp keeps its optimizer state at the site: on disk under its state dir, never in a reply."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app as client_app
from client.optim_state import OPTIMIZER_FILE
from server.run_config import ServerRunConfig
from shared_models import architecture_fingerprint, build_model, partition
from shared_models import protocol as P
from shared_models.partition import Policy
from simulations.domain_shift import DEFAULT_PROFILES, generate_dataset
from tests.helpers import set_task_identity

SPEC = {"name": "unet", "channels": [4, 8], "norm": "batch", "spatial-dims": 2, "in-channels": 1, "out-channels": 3}
SITE = DEFAULT_PROFILES[0].name


def _train(tmp_path, rnd: int, **recipe) -> Message:
    set_task_identity()
    model = build_model(SPEC, seed=0)
    state = model.state_dict()
    shared = partition(model, Policy.parse("fedbn")).shared
    cfg = ServerRunConfig(model=json.dumps(SPEC), run_name="run-a", num_rounds=3, batch_size=4, device="cpu", **recipe)
    record = cfg.round_config(architecture_fingerprint(model)).to_record() | {P.SERVER_ROUND: rnd}
    msg = Message(content=RecordDict({P.ARRAYS: ArrayRecord({k: state[k] for k in shared}), P.CONFIG: ConfigRecord(record)}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"train-{rnd}"
    msg.metadata.__dict__["_src_node_id"] = 0
    node = {"site-id": SITE, "data-dir": str(tmp_path / "data" / SITE), "state-dir": str(tmp_path / "state")}
    return client_app(msg, Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}))


@pytest.fixture
def data(tmp_path):
    generate_dataset(tmp_path / "data", profiles=DEFAULT_PROFILES[:1], cases_per_site=8, size=(16, 16), num_classes=3, seed=0)
    return tmp_path


def _step(path) -> float:
    blob = torch.load(path, weights_only=True)
    return float(next(iter(blob["optimizer_state"]["state"].values()))["step"])


def test_the_optimizer_state_stays_under_the_sites_state_dir_and_out_of_the_reply(data):
    before = {p for p in data.rglob("*") if p.is_file()}
    reply = _train(data, 1)
    written = {p for p in data.rglob("*") if p.is_file()} - before
    assert data / "state" / "run-a" / OPTIMIZER_FILE in written
    assert all((data / "state") in p.parents for p in written)
    model = build_model(SPEC, seed=0)
    assert set(reply.content[P.ARRAYS].keys()) == set(partition(model, Policy.parse("fedbn")).shared)
    optimizer_names = ("exp_avg", "exp_avg_sq", "momentum_buffer", "step", "optimizer")
    assert set(reply.content[P.METRICS].keys()) == set(P.TrainMetrics(1, 0.0, 0.0).to_record())
    assert set(reply.content[P.CONFIG].keys()) == {P.SITE_ID, P.FINGERPRINT}
    for record in reply.content.values():
        assert not any(name in key for key in record.keys() for name in optimizer_names)


def test_the_next_round_continues_the_optimizer_and_reset_starts_it_again(data):
    path = data / "state" / "run-a" / OPTIMIZER_FILE
    _train(data, 1)
    per_round = _step(path)  # 6 training cases, batches of 4: 2 steps
    _train(data, 2)
    assert _step(path) == 2 * per_round
    _train(data, 2)  # round 2 repeated (a resumed federation): starts from round 1's state again
    assert _step(path) == 2 * per_round
    _train(data, 3, persist_optimizer=False)
    assert _step(path) == 2 * per_round  # nothing written, nothing loaded


def test_an_optimizer_of_another_kind_is_not_continued(data, caplog):
    _train(data, 1)
    with caplog.at_level("WARNING", logger="fedsite.client"):
        _train(data, 2, optimizer="sgd")
    assert any(f"site {SITE}" in m and "optimizer 'adam'" in m for m in caplog.messages)
