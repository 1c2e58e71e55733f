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
