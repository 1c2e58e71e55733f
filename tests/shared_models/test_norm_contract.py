"""Contract every registered norm must honour (parametrised over the registry)."""

import pytest
import torch
from flwr.app import ArrayRecord

from shared_models import build_model, partition
from shared_models.norms import NORMS, NormRegistryError, build_norm, norm_names
from shared_models.partition import POLICY_LOCAL_ROLES


@pytest.mark.parametrize("name", norm_names())
@pytest.mark.parametrize("dims,shape", [(2, (4, 8, 9, 7)), (3, (2, 8, 5, 6, 3))])
def test_forward_keeps_shape_and_is_finite(name, dims, shape):
    norm = build_norm(name, 8, dims).train()
    x = torch.randn(shape)
    y = norm(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    y.square().mean().backward()  # differentiable end to end


@pytest.mark.parametrize("name", norm_names())
@pytest.mark.parametrize("policy", list(POLICY_LOCAL_ROLES))
def test_partition_of_unet_is_disjoint_and_complete(name, policy):
    model = build_model({"name": "unet", "channels": [8, 16], "norm": name}, seed=0)
    split = partition(model, policy)
    keys = set(model.state_dict())
    assert set(split.shared) | set(split.local) == keys
    assert not set(split.shared) & set(split.local)
    if policy == "fedavg":
        assert not split.local
    if policy == "local":
        assert not split.shared


@pytest.mark.parametrize("name", norm_names())
def test_fedbn_keeps_every_declared_norm_tensor_local(name):
    model = build_model({"name": "unet", "channels": [8, 16], "norm": name}, seed=0)
    split = partition(model, "fedbn")
    norm_keys = {k for k, role in split.roles.items() if role is not None and role.value != "modulation"}
    assert norm_keys, f"norm {name} declares no tensors at all"
    assert norm_keys <= set(split.local)
    # Conv weights are never local under fedbn.
    assert all(not k.endswith("conv0.weight") for k in split.local)


@pytest.mark.parametrize("name", norm_names())
def test_arrayrecord_round_trip_keeps_dtypes_and_values(name):
    model = build_model({"name": "unet", "channels": [8, 16], "norm": name}, seed=0)
    state = model.state_dict()
    back = ArrayRecord({k: v for k, v in state.items()}).to_torch_state_dict()
    for key, value in state.items():
        assert back[key].dtype == value.dtype, key
        assert torch.equal(back[key].reshape(value.shape), value), key


def test_unknown_norm_and_bad_options_are_named():
    with pytest.raises(NormRegistryError, match="unknown norm 'bogus'"):
        build_norm("bogus", 8, 2)
    with pytest.raises(NormRegistryError, match="bad options"):
        build_norm("batch", 8, 2, not_an_option=1)


def test_registry_refuses_duplicates():
    from shared_models.norms import register_norm

    with pytest.raises(NormRegistryError, match="already registered"):
        register_norm("batch", NORMS["batch"].factory, "dup", batch_independent=False)
