"""No site-local key leaves a site; incoming arrays must fit exactly."""

import pytest
import torch
from flwr.app import ArrayRecord

from client.exchange import LocalKeyLeakError, ModelMismatchError, ensure_no_local_keys, load_shared, shared_record
from shared_models import build_model, partition


@pytest.fixture
def model():
    return build_model({"name": "unet", "channels": [8, 16], "norm": "batch"}, seed=0)


@pytest.mark.parametrize("policy", ["fedavg", "fedbn", "silobn", "local"])
def test_shared_record_holds_exactly_the_shared_keys(model, policy):
    split = partition(model, policy)
    record = shared_record(model, split, "site-a")
    assert set(record.keys()) == set(split.shared)
    assert not set(record.keys()) & set(split.local)


def test_guard_refuses_a_record_with_a_local_key(model):
    split = partition(model, "fedbn")
    leaky = ArrayRecord({split.local[0]: model.state_dict()[split.local[0]]})
    with pytest.raises(LocalKeyLeakError, match="site-a: refusing to send site-local tensors"):
        ensure_no_local_keys(leaky, split, "site-a")


def test_load_shared_is_strict_and_leaves_local_tensors(model):
    split = partition(model, "fedbn")
    other = build_model({"name": "unet", "channels": [8, 16], "norm": "batch"}, seed=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
    before_local = {k: model.state_dict()[k].clone() for k in split.local}
    load_shared(model, shared_record(other, split, "srv"), split, "site-a")
    state = model.state_dict()
    assert all(torch.equal(state[k], before_local[k]) for k in split.local)
    assert all(torch.equal(state[k], other.state_dict()[k]) for k in split.shared)

    missing = ArrayRecord({k: state[k] for k in split.shared[1:]})
    with pytest.raises(ModelMismatchError, match="missing"):
        load_shared(model, missing, split, "site-a")
    wrong = {k: state[k] for k in split.shared}
    key = next(k for k in split.shared if k.endswith("conv0.weight"))
    wrong[key] = torch.zeros(3, 3)
    with pytest.raises(ModelMismatchError, match=key):
        load_shared(model, ArrayRecord(wrong), split, "site-a")


_NARROW = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("transport", ["fp16", "bf16"])
@pytest.mark.parametrize("policy", ["fedavg", "fedbn", "silobn", "local"])
def test_a_narrowed_record_holds_the_shared_keys_only_integers_unchanged(model, policy, transport):
    split = partition(model, policy)
    record = shared_record(model, split, "site-a", transport)
    assert set(record.keys()) == set(split.shared)
    state = model.state_dict()
    for key, array in record.items():
        expected = ("float16" if transport == "fp16" else "uint16") if state[key].is_floating_point() else "int64"
        assert array.dtype == expected, key
    if policy == "fedavg":  # BatchNorm's step counters are shared under FedAvg and travel as int64
        assert any(k.endswith("num_batches_tracked") for k in record.keys())


@pytest.mark.parametrize("transport", ["fp16", "bf16"])
def test_a_site_upcasts_the_narrowed_global_model_on_receipt(model, transport):
    split = partition(model, "fedavg")
    other = build_model({"name": "unet", "channels": [8, 16], "norm": "batch"}, seed=1)
    received = load_shared(model, shared_record(other, split, "srv", transport), split, "site-a", transport)
    state = model.state_dict()
    for key in split.shared:
        source = other.state_dict()[key]
        expected = source.to(_NARROW[transport]).to(source.dtype) if source.is_floating_point() else source
        assert state[key].dtype == source.dtype and torch.equal(state[key], expected), key
        assert received[key].dtype == source.dtype
