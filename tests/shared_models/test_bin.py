"""Batch-Instance Normalization: methods.md §2.2 and §2.5 (5 for BIN, 7)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared_models import build_model, partition
from shared_models.norms import NORMS, TensorRole, build_norm
from shared_models.norms.bin import BatchInstanceNorm
from shared_models.norms.optim import param_groups, project_

POLICIES = ("fedavg", "fedbn", "silobn", "local")


def _random_affine(layer: nn.Module, other: nn.Module) -> None:
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        other.weight.copy_(layer.weight)
        other.bias.copy_(layer.bias)


def test_rho_one_in_train_mode_is_batch_norm_including_running_stats() -> None:
    layer, bn = BatchInstanceNorm(6, 2, rho_init=1.0), nn.BatchNorm2d(6)
    _random_affine(layer, bn)
    x = torch.randn(4, 6, 7, 5) * 3 + 1
    torch.testing.assert_close(layer(x), bn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert int(layer.num_batches_tracked) == 1
    layer.eval(), bn.eval()
    torch.testing.assert_close(layer(x), bn(x), atol=1e-5, rtol=1e-5)


def test_rho_zero_is_instance_norm_with_shared_affine() -> None:
    layer, inorm = BatchInstanceNorm(6, 2, rho_init=0.0), nn.InstanceNorm2d(6, affine=True)
    _random_affine(layer, inorm)
    x = torch.randn(4, 6, 7, 5) * 3 + 1
    torch.testing.assert_close(layer(x), inorm(x), atol=1e-5, rtol=1e-5)
    layer.eval()  # the IN part never uses running stats
    torch.testing.assert_close(layer(x), inorm(x), atol=1e-5, rtol=1e-5)


def test_clamp_keeps_rho_in_unit_interval_after_a_huge_step() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), BatchInstanceNorm(4, 2, rho_init=0.5), nn.Conv2d(4, 2, 1))
    optimizer = torch.optim.SGD(param_groups(model, lr=1.0, weight_decay=0.0), lr=1.0)
    x = torch.randn(3, 2, 8, 8)
    (model(x) * torch.randn(3, 2, 6, 6)).sum().mul(1e4).backward()
    optimizer.step()
    rho = model[1].rho
    assert ((rho < 0) | (rho > 1)).any()  # the step alone leaves [0, 1] ...
    project_(model)
    assert ((rho >= 0) & (rho <= 1)).all()  # ... the clamp brings it back
    assert ((rho == 0) | (rho == 1)).any()


def test_param_groups_give_rho_its_lr_and_no_weight_decay() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), BatchInstanceNorm(4, 2), nn.Conv2d(4, 2, 1), BatchInstanceNorm(2, 2))
    groups = param_groups(model, lr=0.01, weight_decay=1e-4)
    assert len(groups) == 2
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    rho_group = groups[1]
    assert {id(p) for p in rho_group["params"]} == {id(model[1].rho), id(model[3].rho)}
    assert rho_group["lr"] == pytest.approx(0.1) and rho_group["weight_decay"] == 0.0
    assert groups[0]["lr"] == 0.01 and groups[0]["weight_decay"] == 1e-4
    assert len(param_groups(nn.Conv2d(1, 1, 1), 0.1, 0.0)) == 1


def test_gradient_reaches_rho_for_generic_mix() -> None:
    layer = BatchInstanceNorm(4, 2, rho_init=0.5)
    (layer(torch.randn(3, 4, 5, 5)) * torch.randn(3, 4, 5, 5)).sum().backward()
    assert layer.rho.grad is not None and (layer.rho.grad.abs() > 1e-6).all()


@pytest.mark.parametrize("dims,shape,bn_cls", [(1, (3, 4, 9), nn.BatchNorm1d), (3, (2, 4, 3, 5, 4), nn.BatchNorm3d)])
def test_other_dims_match_batch_norm(dims: int, shape: tuple[int, ...], bn_cls: type[nn.Module]) -> None:
    layer, bn = build_norm("bin", 4, dims), bn_cls(4)
    _random_affine(layer, bn)
    x = torch.randn(*shape)
    y = layer(x)
    assert y.shape == shape
    torch.testing.assert_close(y, bn(x), atol=1e-5, rtol=1e-5)
    assert not NORMS["bin"].batch_independent


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("policy", POLICIES)
def test_partition_covers_unet_with_bin(spatial_dims: int, policy: str) -> None:
    model = build_model({"name": "unet", "spatial-dims": spatial_dims, "channels": [4, 8], "norm": "bin"}, seed=0)
    split = partition(model, policy)
    keys = set(model.state_dict())
    assert set(split.shared) | set(split.local) == keys and not set(split.shared) & set(split.local)
    stats = {k for k in keys if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
    rhos = {k for k in keys if k.endswith(".rho")}
    assert stats and all(split.roles[k] is TensorRole.STATISTIC for k in stats)
    assert rhos and all(split.roles[k] is TensorRole.MIXING for k in rhos)
    if policy != "fedavg":
        assert stats <= set(split.local)
    if policy == "fedbn":
        assert rhos <= set(split.local)
    if policy == "silobn":
        assert rhos <= set(split.shared)

