"""Instance-Layer Normalization: the properties of methods.md §2.5 (1-4, 5 for ILN, 6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared_models import build_model, partition
from shared_models.norms import NORMS, TensorRole, build_norm
from shared_models.norms.iln import InstanceLayerNorm, iln_num_groups
from shared_models.partition import Policy

POLICIES = ("fedavg", "fedbn", "silobn", "local")


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 2.0 + 0.5


def _group_stats(y: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = y.reshape(y.shape[0], groups, -1)
    return flat.mean(-1), flat.var(-1, unbiased=False)


@pytest.mark.parametrize("rho", [-3.0, 0.0, 2.0, "random"])
def test_output_is_normalized_per_group(rho: float | str) -> None:
    layer = InstanceLayerNorm(8, 2, num_groups=4)
    with torch.no_grad():
        layer.rho.copy_(torch.randn(8) * 3 if rho == "random" else torch.full((8,), float(rho)))
    mean, var = _group_stats(layer(_x(3, 8, 9, 7)), 4)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_independence(mode: str) -> None:
    layer = InstanceLayerNorm(8, 2, num_groups=4)
    with torch.no_grad():
        layer.rho.normal_()
    layer.train(mode == "train")
    x = _x(4, 8, 6, 6)
    full = layer(x)
    for i in range(4):
        torch.testing.assert_close(full[i : i + 1], layer(x[i : i + 1]), atol=1e-6, rtol=1e-5)


def test_train_and_eval_are_identical() -> None:
    layer = InstanceLayerNorm(8, 2, num_groups=2)
    with torch.no_grad():
        layer.rho.normal_()
        layer.weight.normal_()
        layer.bias.normal_()
    x = _x(2, 8, 5, 5)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert torch.equal(y_train, y_eval)
    assert not list(layer.buffers())  # nothing that could differ


@pytest.mark.parametrize("groups", [6, 2])
def test_limit_rho_plus_inf_is_instance_norm(groups: int) -> None:
    """G = C is the spec's case (there GN alone already gives IN); G = 2 makes the limit depend on rho."""
    x = _x(2, 6, 8, 8)
    layer = InstanceLayerNorm(6, 2, num_groups=groups, rho_init=30.0)
    torch.testing.assert_close(layer(x), F.instance_norm(x, eps=1e-5), atol=1e-4, rtol=1e-4)
    if groups == 2:  # at the other end the output is far from IN
        far = InstanceLayerNorm(6, 2, num_groups=groups, rho_init=-30.0)(x)
        assert (far - F.instance_norm(x)).abs().max() > 0.1


def test_limit_rho_minus_inf_with_one_group_is_layer_norm() -> None:
    layer = InstanceLayerNorm(6, 2, num_groups=1, rho_init=-30.0)
    x = _x(2, 6, 8, 8)
    torch.testing.assert_close(layer(x), F.group_norm(x, 1, eps=1e-5), atol=1e-4, rtol=1e-4)


def test_gradient_reaches_rho() -> None:
    layer = InstanceLayerNorm(8, 2, num_groups=4)
    x = _x(2, 8, 6, 6)
    (layer(x) * torch.randn(2, 8, 6, 6)).sum().backward()
    assert layer.rho.grad is not None
    assert (layer.rho.grad.abs() > 1e-6).all()


def test_affine_invariance() -> None:
    layer = InstanceLayerNorm(8, 2, num_groups=4)
    with torch.no_grad():
        layer.rho.normal_()
        layer.weight.normal_()
        layer.bias.normal_()
    x = _x(2, 8, 6, 6)
    torch.testing.assert_close(layer(3.0 * x - 2.0), layer(x), atol=1e-4, rtol=1e-4)


def test_group_rule_never_one_channel_a_group() -> None:
    """methods.md §2: 32 groups from C = 64, C/2 for C <= 32, in general the largest divisor <= 32 and < C."""
    assert [iln_num_groups(c) for c in (1, 2, 4, 7, 8, 12, 16, 32, 48, 64, 128, 96)] == [1, 1, 2, 1, 4, 6, 8, 16, 24, 32, 32, 32]
    assert iln_num_groups(16, num_groups=16) == 16  # an explicit choice is honoured
    with pytest.raises(ValueError, match="num_groups=5 does not divide num_features=16"):
        InstanceLayerNorm(16, 2, num_groups=5)


# Every width a shipped configuration or the default model gives a norm layer.
SHIPPED_WIDTHS = (4, 8, 16, 32, 64, 128)


@pytest.mark.parametrize("width", SHIPPED_WIDTHS)
def test_rho_changes_the_output_at_every_shipped_width(width: int) -> None:
    torch.manual_seed(0)
    x = _x(2, width, 8, 8)
    inst, layer = build_norm("iln", width, 2, rho_init=30.0), build_norm("iln", width, 2, rho_init=-30.0)
    assert (inst(x) - layer(x)).abs().max() > 0.1


def test_group_fallback_and_registry() -> None:
    assert NORMS["iln"].batch_independent
    layer = build_norm("iln", 12, 2, num_groups=4, rho_init=1.0)
    assert isinstance(layer, InstanceLayerNorm) and layer.num_groups == 4
    assert torch.all(layer.rho == 1.0)


@pytest.mark.parametrize("dims,shape", [(1, (2, 8, 11)), (2, (2, 8, 5, 7)), (3, (2, 8, 4, 5, 6))])
def test_shapes_and_group_normalization_in_every_dim(dims: int, shape: tuple[int, ...]) -> None:
    layer = build_norm("iln", 8, dims, num_groups=4)
    y = layer(_x(*shape))
    assert y.shape == shape
    mean, _ = _group_stats(y, 4)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    wrong_rank = _x(*shape, 2)
    with pytest.raises(ValueError):
        layer(wrong_rank)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("policy", POLICIES)
def test_partition_covers_unet_with_iln(spatial_dims: int, policy: str) -> None:
    model = build_model({"name": "unet", "spatial-dims": spatial_dims, "channels": [4, 8], "norm": "iln"}, seed=0)
    split = partition(model, policy)
    keys = set(model.state_dict())
    assert set(split.shared) | set(split.local) == keys
    assert not set(split.shared) & set(split.local)
    rhos = {k for k in keys if k.endswith(".rho")}
    assert rhos and all(split.roles[k] is TensorRole.MIXING for k in rhos)
    if policy == "fedbn":
        assert rhos <= set(split.local)
        assert rhos <= set(partition(model, Policy.parse("fedbn", {"mixing": "shared"})).shared)
    if policy == "silobn":  # no statistics: SiloBN shares everything
        assert not split.local
