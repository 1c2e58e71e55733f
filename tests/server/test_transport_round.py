"""A real round (server loop + in-process ClientApps) under each transport dtype: exact bytes, nothing local sent."""

import json
from pathlib import Path

import numpy as np
import pytest

from server.checkpoint import CheckpointStore
from server.rounds import run_federation
from server.run_config import ServerRunConfig
from shared_models import architecture_fingerprint, build_model, partition
from shared_models import protocol as P
from simulations.domain_shift import DEFAULT_PROFILES
from tests.helpers import TINY_UNET as MODEL, LocalGrid, two_site_data

pytestmark = pytest.mark.slow

SITES = [p.name for p in DEFAULT_PROFILES[:2]]
RUNS = [("fedbn", "fp32"), ("fedbn", "fp16"), ("fedavg", "fp32"), ("fedavg", "bf16")]


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    root = tmp_path_factory.mktemp("transport")
    _, data = two_site_data(root)
    out = {}
    for policy, transport in RUNS:
        name = f"{policy}-{transport}"
        replies = []  # (kind, {key: dtype} as the site sent it, or None without arrays)

        def seen(site, kind, rnd, content, replies=replies):
            replies.append((kind, {k: a.dtype for k, a in content[P.ARRAYS].items()} if P.ARRAYS in content else None))

        grid = LocalGrid(SITES, data, root / name / "state", on_reply=seen)
        cfg = ServerRunConfig(model=json.dumps(MODEL), run_name=name, out_dir=str(root / name / "out"), num_rounds=1, batch_size=4,
                              policy=policy, transport_dtype=transport, min_nodes=2, wait_seconds=5, round_timeout=60)
        out[policy, transport] = (run_federation(grid, cfg), grid, replies)
    return out


def _shared(policy):
    model = build_model(MODEL, seed=0)
    split, state = partition(model, policy), model.state_dict()
    floats = sum(state[k].numel() for k in split.shared if state[k].is_floating_point())
    ints = sum(state[k].numel() * state[k].element_size() for k in split.shared if not state[k].is_floating_point())
    return split, floats, ints


@pytest.mark.parametrize("policy,transport", RUNS)
def test_the_round_reports_the_exact_tensor_bytes(rounds, policy, transport):
    result, _, _ = rounds[policy, transport]
    entry = result.history[0]
    _, floats, ints = _shared(policy)
    per_model = floats * (4 if transport == "fp32" else 2) + ints
    n = len(SITES)
    assert entry["tensor_bytes_received"] == n * per_model  # one update per site
    assert entry["tensor_bytes_sent"] == 2 * n * per_model  # the global model to each site, to train and to evaluate
    assert result.tensor_bytes_sent == entry["tensor_bytes_sent"] and set(result.per_site) == set(SITES)
    assert not entry["rejected"] and "skipped" not in entry  # every narrowed update passed the gate and was aggregated


def test_fp16_halves_a_round_when_every_shared_tensor_is_floating(rounds):
    full, half = rounds["fedbn", "fp32"][0].history[0], rounds["fedbn", "fp16"][0].history[0]
    for key in ("tensor_bytes_sent", "tensor_bytes_received"):
        assert half[key] * 2 == full[key]
    assert half["bytes_sent"] < full["bytes_sent"] and half["bytes_received"] < full["bytes_received"]


@pytest.mark.parametrize("policy,transport", [r for r in RUNS if r[1] != "fp32"])
def test_what_travels_is_narrowed_shared_tensors_only(rounds, policy, transport):
    _, grid, replies = rounds[policy, transport]
    split, _, _ = _shared(policy)
    state = build_model(MODEL, seed=0).state_dict()
    wire = "float16" if transport == "fp16" else "uint16"
    trains = [dtypes for kind, dtypes in replies if kind == "train"]
    sent = [{k: a.dtype for k, a in m.content[P.ARRAYS].items()} for m in grid.sent if m.metadata.message_type != "query"]
    assert len(trains) == len(SITES) and len(sent) == 2 * len(SITES)
    for dtypes in trains + sent:
        assert set(dtypes) == set(split.shared) and not set(dtypes) & set(split.local)
        for key, dtype in dtypes.items():
            assert dtype == (wire if state[key].is_floating_point() else "int64"), key
    assert all(dtypes is None for kind, dtypes in replies if kind == "evaluate")


def test_the_server_keeps_its_global_model_in_fp32(rounds):
    fingerprint = architecture_fingerprint(build_model(MODEL, seed=0))
    state = build_model(MODEL, seed=0).state_dict()
    for policy, transport in RUNS:
        result, _, _ = rounds[policy, transport]
        assert np.isfinite(result.mean_dice), (policy, transport)
        store = CheckpointStore(Path(result.config["out-dir"]) / "checkpoints", keep=3)
        arrays = store.latest(run_name=result.run_name, fingerprint=fingerprint, policy=policy).arrays
        assert {k: v.dtype for k, v in arrays.items()} == {k: state[k].dtype for k in arrays}
