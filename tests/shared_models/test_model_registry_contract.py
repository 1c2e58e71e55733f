"""Contract every registered model must honour (parametrised over the model registry).

A newly registered model gets these tests by being registered; it only needs a
small spec below (the first test fails until it has one).
"""

from __future__ import annotations

import pytest
import torch

from shared_models import build_model, partition
from shared_models.build import architecture_fingerprint
from shared_models.nets import model_names
from shared_models.partition import POLICY_LOCAL_ROLES

NUM_CLASSES = 3

# name -> (small hyper-parameters, spatial dims the network supports)
SMALL: dict[str, tuple[dict, tuple[int, ...]]] = {
    "unet": ({"channels": [4, 8]}, (2, 3)),
    "dualnorm_unet": ({"channels": [4, 8]}, (2, 3)),
    "segnetr": ({"channels": [4, 8], "window": 2}, (2, 3)),
    "uxnet": ({"channels": [4, 8], "ops": ["conv3", "identity"]}, (2, 3)),
    "monai_unet": ({"channels": [4, 8], "num_res_units": 1}, (2, 3)),
    "monai_basicunet": ({"features": [4, 4, 4, 4, 4, 4]}, (2, 3)),
    "monai_dynunet": ({"filters": [4, 4, 8], "res_block": False}, (2, 3)),
    "monai_segresnet": ({"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1]}, (2, 3)),
    "monai_attentionunet": ({"channels": [4, 8]}, (2, 3)),
}
SPATIAL = {2: (8, 12), 3: (8, 4, 4)}  # divisible by every spec's downsampling (at most 4x)
FOUR_DOWNSAMPLINGS = {2: (32, 16), 3: (32, 16, 16)}  # BasicUNet always halves four times


def input_size(name: str, dims: int) -> tuple[int, ...]:
    return FOUR_DOWNSAMPLINGS[dims] if name == "monai_basicunet" else SPATIAL[dims]


def spec(name: str, dims: int) -> dict:
    return {"name": name, "spatial_dims": dims, "out_channels": NUM_CLASSES, **SMALL[name][0]}


CASES = [(name, dims) for name in model_names() if name in SMALL for dims in SMALL[name][1]]


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_has_a_small_spec(name):
    assert name in SMALL, f"add a small spec for {name!r} to SMALL so the contract covers it"


@pytest.mark.parametrize("name,dims", CASES)
def test_forward_backward_gives_per_class_logits_of_the_input_size(name, dims):
    # Prepare
    model = build_model(spec(name, dims), seed=0).train()
    x = torch.randn(2, 1, *input_size(name, dims), generator=torch.Generator().manual_seed(0), requires_grad=True)
    # Execute
    y = model(x)
    y.square().mean().backward()
    # Assert
    assert y.shape == (2, NUM_CLASSES, *input_size(name, dims))
    assert torch.isfinite(y).all()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the gradient reaches the input
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", [n for n in model_names() if n in SMALL])
@pytest.mark.parametrize("policy", list(POLICY_LOCAL_ROLES))
def test_partition_covers_every_key_once_under_every_policy(name, policy):
    # Prepare
    model = build_model(spec(name, 2), seed=0)
    keys = set(model.state_dict())
    # Execute
    split = partition(model, policy)
    # Assert
    assert set(split.shared) | set(split.local) == keys
    assert len(split.shared) + len(split.local) == len(keys)
    if policy == "fedavg":
        assert not split.local
    if policy == "local":
        assert not split.shared
    if policy == "fedbn":
        norm_keys = {k for k, role in split.roles.items() if role is not None and role.value != "modulation"}
        assert norm_keys, f"{name} has no norm tensor for FedBN to keep local"
        assert norm_keys <= set(split.local)


@pytest.mark.parametrize("name", [n for n in model_names() if n in SMALL])
def test_same_seed_builds_the_same_tensors_and_fingerprint(name):
    # Execute
    a, b = build_model(spec(name, 2), seed=7), build_model(spec(name, 2), seed=7)
    other_seed = build_model(spec(name, 2), seed=8)
    # Assert
    assert architecture_fingerprint(a) == architecture_fingerprint(b) == architecture_fingerprint(other_seed)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], v) for k, v in other_seed.state_dict().items())
    assert architecture_fingerprint(a) != architecture_fingerprint(build_model({**spec(name, 2), "out_channels": NUM_CLASSES + 1}))
