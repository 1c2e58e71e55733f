"""Every registered network, built by its registered name: the contract the federation relies on."""

from __future__ import annotations

import pytest
import torch

from shared_models import architecture_fingerprint, build_model, partition
from shared_models.nets.registry import model_names
from shared_models.partition import POLICY_LOCAL_ROLES

# Small widths so the whole file runs in seconds; a network missing here is built at its defaults.
SMALL = {
    "dualnorm_unet": {"channels": [4, 8]},
    "monai_basicunet": {"features": [4, 4, 8, 8, 8, 4]},
    "monai_unet": {"channels": [4, 8], "num-res-units": 1},
    "segnetr": {"channels": [8, 16]},
    "unet": {"channels": [4, 8]},
    "uxnet": {"channels": [4, 8]},
}
SHAPES = {2: (2, 1, 32, 32), 3: (2, 1, 32, 32, 32)}  # 32: every network downsamples to > 1 voxel


def _spec(name: str, dims: int) -> dict:
    return {"name": name, "spatial-dims": dims, "in-channels": 1, "out-channels": 3, **SMALL.get(name, {})}


def _build(name: str, dims: int):
    try:
        return build_model(_spec(name, dims), seed=0)
    except ValueError as exc:
        if dims == 3 and "3" in str(exc):
            pytest.skip(f"{name} is 2D only: {exc}")
        raise


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", model_names())
def test_builds_by_name_runs_forward_and_backward(name: str, dims: int) -> None:
    torch.manual_seed(0)
    model = _build(name, dims).train()
    x = torch.randn(*SHAPES[dims])
    out = model(x)
    assert out.shape == (x.shape[0], 3, *x.shape[2:])
    out.float().square().mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize("policy", sorted(POLICY_LOCAL_ROLES))
@pytest.mark.parametrize("name", model_names())
def test_partition_covers_every_key_under_every_policy(name: str, policy: str) -> None:
    model = _build(name, 2)
    split = partition(model, policy)
    keys = set(model.state_dict())
    assert set(split.shared) | set(split.local) == keys
    assert not set(split.shared) & set(split.local)
    if policy == "local":
        assert not split.shared
    if policy == "fedavg":
        assert not split.local


@pytest.mark.parametrize("name", model_names())
def test_fingerprint_is_stable_and_tracks_the_architecture(name: str) -> None:
    a, b = _build(name, 2), _build(name, 2)
    assert architecture_fingerprint(a) == architecture_fingerprint(b)
    other = build_model({**_spec(name, 2), "out-channels": 4}, seed=0)
    assert architecture_fingerprint(other) != architecture_fingerprint(a)
