"""Switchable Normalization: the properties of methods.md §6.6, plus the §6.2-6.4 options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared_models import build_model, partition
from shared_models.norms import TensorRole, build_norm
from shared_models.norms.switchable import SwitchNorm, pooled_moments, recompute_sn_bn_stats, switchable_weights
from shared_models.partition import Policy

POLICIES = ("fedavg", "fedbn", "silobn", "local")
BIG = 1e4


def _one_hot(layer: SwitchNorm, branch: int) -> SwitchNorm:
    """Set lambda so that softmax is one-hot on ``branch`` (0 IN, 1 LN, 2 BN), for mean and var."""
    with torch.no_grad():
        for param in (layer.mean_weight, layer.var_weight):
            param.fill_(-BIG)
            param[branch] = BIG
    return layer


def _with_affine(layer: SwitchNorm, reference: nn.Module) -> None:
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        reference.weight.copy_(layer.weight)
        reference.bias.copy_(layer.bias)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 1.5 + 0.7


@pytest.mark.parametrize(
    "branch,reference",
    [
        (0, lambda: nn.InstanceNorm2d(6, affine=True)),
        (1, lambda: nn.GroupNorm(1, 6)),
        (2, lambda: nn.BatchNorm2d(6)),
    ],
    ids=["in", "ln", "bn"],
)
def test_one_hot_lambda_equals_the_torch_layer_in_train_mode(branch: int, reference) -> None:
    layer, ref = _one_hot(SwitchNorm(6, 2), branch), reference()
    _with_affine(layer, ref)
    x = _x(4, 6, 7, 5)
    torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)


def test_one_hot_bn_in_3d_equals_batchnorm3d() -> None:
    layer, ref = _one_hot(SwitchNorm(4, 3), 2), nn.BatchNorm3d(4)
    _with_affine(layer, ref)
    x = _x(2, 4, 3, 5, 4)
    torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)


def test_derived_statistics_equal_direct_ones() -> None:
    x = _x(3, 5, 6, 7)
    flat = x.reshape(3, 5, -1)
    var_in, mean_in = torch.var_mean(flat, dim=-1, keepdim=True, correction=0)
    second = var_in + mean_in**2
    mean_ln, var_ln = pooled_moments(mean_in, second, dim=1)
    mean_bn, var_bn = pooled_moments(mean_in, second, dim=0)
    torch.testing.assert_close(mean_ln.flatten(), x.mean(dim=(1, 2, 3)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(var_ln.flatten(), x.var(dim=(1, 2, 3), unbiased=False), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean_bn.flatten(), x.mean(dim=(0, 2, 3)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(var_bn.flatten(), x.var(dim=(0, 2, 3), unbiased=False), atol=1e-6, rtol=1e-5)
    # the official unbiased IN variance inflates the derived variance by about |S| / (|S| - 1)
    var_u, _ = torch.var_mean(flat, dim=-1, keepdim=True, correction=1)
    _, var_ln_u = pooled_moments(mean_in, var_u + mean_in**2, dim=1)
    assert (var_ln_u.flatten() > x.var(dim=(1, 2, 3), unbiased=False) * 1.01).all()


def test_unbiased_in_var_option_uses_the_unbiased_estimator() -> None:
    x = _x(2, 3, 4, 5)
    layer = _one_hot(SwitchNorm(3, 2, unbiased_in_var=True), 0)
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=1)
    torch.testing.assert_close(layer(x), (x - mean) / torch.sqrt(var + 1e-5), atol=1e-5, rtol=1e-5)
    biased = _one_hot(SwitchNorm(3, 2), 0)
    assert (layer(x) - biased(x)).abs().max() > 1e-3


def test_weights_sum_to_one_and_start_equal() -> None:
    layer = SwitchNorm(4, 2)
    for param in (layer.mean_weight, layer.var_weight):
        weights = torch.softmax(param, 0)
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
        torch.testing.assert_close(weights, torch.full((3,), 1 / 3))
    with torch.no_grad():
        layer.mean_weight.normal_()
    torch.testing.assert_close(torch.softmax(layer.mean_weight, 0).sum(), torch.tensor(1.0))


def test_eval_with_one_hot_bn_equals_eval_batchnorm_with_the_same_buffers() -> None:
    bn = nn.BatchNorm2d(6)
    bn(_x(8, 6, 5, 5))  # give it non-trivial running stats
    layer = _one_hot(SwitchNorm(6, 2), 2)
    _with_affine(layer, bn)
    layer.running_mean.copy_(bn.running_mean)
    layer.running_var.copy_(bn.running_var)
    layer.eval(), bn.eval()
    x = _x(3, 6, 4, 4)
    torch.testing.assert_close(layer(x), bn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims,momentum", [(2, 0.1), (3, 0.003)])
def test_running_stat_update_rule(dims: int, momentum: float) -> None:
    """PyTorch convention r <- (1 - m) r + m s is the official convention r <- m' r + (1 - m') s, m' = 1 - m."""
    layer = SwitchNorm(4, dims, momentum=momentum)
    old_mean, old_var = torch.randn(4), torch.rand(4) + 0.5
    layer.running_mean.copy_(old_mean)
    layer.running_var.copy_(old_var)
    x = _x(3, 4, *([5] * dims))
    layer(x)
    reduce = (0, *range(2, x.dim()))
    mu, var = x.mean(reduce), x.var(reduce, unbiased=False)
    torch.testing.assert_close(layer.running_mean, (1 - momentum) * old_mean + momentum * mu)
    official = 1 - momentum
    torch.testing.assert_close(layer.running_var, official * old_var + (1 - official) * var)
    layer.eval()
    layer(x)  # eval never updates
    torch.testing.assert_close(layer.running_mean, (1 - momentum) * old_mean + momentum * mu)


def test_default_buffers_start_at_zero_and_without_moving_average_accumulate_sums() -> None:
    layer = SwitchNorm(3, 2, using_moving_average=False)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.zeros(3))
    a, b = _x(2, 3, 4, 4), _x(2, 3, 4, 4)
    layer(a), layer(b)
    mus = [t.mean((0, 2, 3)) for t in (a, b)]
    vars_ = [t.var((0, 2, 3), unbiased=False) for t in (a, b)]
    torch.testing.assert_close(layer.running_mean, mus[0] + mus[1])
    torch.testing.assert_close(layer.running_var, sum(m**2 + v for m, v in zip(mus, vars_)))


def test_batch_independence_without_bn() -> None:
    layer = SwitchNorm(4, 2, using_bn=False)
    with torch.no_grad():
        layer.mean_weight.normal_()
        layer.var_weight.normal_()
    assert not list(layer.buffers()) and layer.mean_weight.numel() == 2
    x = _x(3, 4, 5, 5)
    full = layer(x)
    for i in range(3):
        torch.testing.assert_close(full[i : i + 1], layer(x[i : i + 1]), atol=1e-6, rtol=1e-5)
    with_bn = SwitchNorm(4, 2)  # the BN branch makes samples interact
    assert (with_bn(x)[:1] - with_bn(x[:1])).abs().max() > 1e-3


def test_recompute_is_the_arithmetic_mean_of_per_batch_statistics() -> None:
    model = nn.Sequential(SwitchNorm(3, 2), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), SwitchNorm(3, 2))
    model.train()
    batches = [(_x(2, 3, 4, 4) * (i + 1), torch.zeros(1)) for i in range(4)]
    bn_mean_before = model[2].running_mean.clone()
    used = recompute_sn_bn_stats(model, batches, num_batches=3)
    assert used == 3
    mus = torch.stack([b[0].mean((0, 2, 3)) for b in batches[:3]])
    vars_ = torch.stack([b[0].var((0, 2, 3), unbiased=False) for b in batches[:3]])
    torch.testing.assert_close(model[0].running_mean, mus.mean(0))
    torch.testing.assert_close(model[0].running_var, vars_.mean(0))
    assert model.training and all(m.training for m in model)  # modes restored
    assert torch.equal(model[2].running_mean, bn_mean_before)  # other BN layers untouched
    assert model[3].running_var.abs().sum() > 0  # deeper SN layers recomputed too

    recompute_sn_bn_stats(model, [b[0] for b in batches[:3]], num_batches=3, mode="pooled")
    torch.testing.assert_close(model[0].running_mean, mus.mean(0))
    pooled = torch.cat([b[0] for b in batches[:3]]).var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(model[0].running_var, pooled)


@pytest.mark.parametrize("param", ["mean_weight", "var_weight"])
def test_gradient_reaches_lambda(param: str) -> None:
    layer = SwitchNorm(4, 2)
    with torch.no_grad():
        layer.running_var.fill_(1.0)
    (layer(_x(3, 4, 5, 5)) * torch.randn(3, 4, 5, 5)).sum().backward()
    grad = getattr(layer, param).grad
    assert grad is not None and (grad.abs() > 1e-6).all()


def test_last_gamma_and_switchable_weights_report() -> None:
    assert torch.equal(SwitchNorm(4, 2, last_gamma=True).weight, torch.zeros(4))
    model = nn.Sequential(_one_hot(SwitchNorm(4, 2), 2), nn.ReLU(), SwitchNorm(4, 2, using_bn=False))
    report = switchable_weights(model)
    assert set(report) == {"0", "2"}
    assert report["0"]["mean"] == pytest.approx([0.0, 0.0, 1.0])
    assert report["2"]["var"] == pytest.approx([0.5, 0.5, 0.0])


@pytest.mark.parametrize("dims,shape", [(1, (2, 4, 9)), (2, (2, 4, 5, 6)), (3, (2, 4, 3, 4, 5))])
def test_shapes_in_every_dim(dims: int, shape: tuple[int, ...]) -> None:
    layer = build_norm("switchable", 4, dims, unbiased_in_var=True)
    assert layer(_x(*shape)).shape == shape
    layer.eval()
    assert layer(_x(*shape)).shape == shape


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("policy", POLICIES)
def test_partition_covers_unet_with_switchable(spatial_dims: int, policy: str) -> None:
    spec = {"name": "unet", "spatial-dims": spatial_dims, "channels": [4, 8], "norm": "switchable"}
    model = build_model(spec, seed=0)
    keys = set(model.state_dict())
    lambdas = {k for k in keys if k.endswith(("mean_weight", "var_weight"))}
    stats = {k for k in keys if k.endswith(("running_mean", "running_var"))}
    assert lambdas and stats
    for where in ("local", "shared"):
        split = partition(model, Policy.parse(policy, {"mixing": where}))
        assert set(split.shared) | set(split.local) == keys and not set(split.shared) & set(split.local)
        assert all(split.roles[k] is TensorRole.MIXING for k in lambdas)
        if policy != "fedavg":
            assert stats <= set(split.local)
        if policy != "local":  # under "local" nothing is shared whatever the override
            assert lambdas <= set(split.local if where == "local" else split.shared)


# Non-one-hot lambda, checked against methods.md §6.2 written out directly: every
# statistic straight from x (no derived moments), w = softmax(lambda_mean) over the
# three means and w' = softmax(lambda_var) over the three VARIANCES.
LAMBDA_MEAN = (1.3, -0.7, 0.4)
LAMBDA_VAR = (-0.9, 0.2, 1.1)


def _spread_x(n: int, c: int, *spatial: int) -> torch.Tensor:
    """Samples and channels with different offsets and scales, so IN, LN and BN statistics differ a lot."""
    gen = torch.Generator().manual_seed(7)
    scale = torch.linspace(0.5, 3.0, n).view(n, 1, *[1] * len(spatial)) * torch.linspace(0.7, 1.6, c).view(1, c, *[1] * len(spatial))
    offset = torch.randn(n, c, *[1] * len(spatial), generator=gen) * 2.0
    return torch.randn(n, c, *spatial, generator=gen) * scale + offset


def _mixed(layer: SwitchNorm, lam_mean=LAMBDA_MEAN, lam_var=LAMBDA_VAR) -> SwitchNorm:
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor(lam_mean[: layer.mean_weight.numel()]))
        layer.var_weight.copy_(torch.tensor(lam_var[: layer.var_weight.numel()]))
        layer.weight.copy_(torch.linspace(0.5, 1.5, layer.num_features))
        layer.bias.copy_(torch.linspace(-0.3, 0.3, layer.num_features))
    return layer


def _direct_switch_norm(x: torch.Tensor, layer: SwitchNorm, bn: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """y = gamma (x - sum_k w_k mu_k) / sqrt(sum_k w'_k sigma2_k + eps) + beta; ``bn`` = (mean, var) or None for batch stats."""
    spatial = tuple(range(2, x.dim()))
    keep = (1, -1, *[1] * len(spatial))
    means = [x.mean(spatial, keepdim=True), x.mean((1, *spatial), keepdim=True)]
    variances = [x.var(spatial, keepdim=True, unbiased=False), x.var((1, *spatial), keepdim=True, unbiased=False)]
    if layer.using_bn:
        if bn is None:
            bn = x.mean((0, *spatial)), x.var((0, *spatial), unbiased=False)
        means.append(bn[0].view(keep))
        variances.append(bn[1].view(keep))
    w, w_var = torch.softmax(layer.mean_weight, 0), torch.softmax(layer.var_weight, 0)
    mu = sum(w[k] * means[k] for k in range(len(means)))
    sigma2 = sum(w_var[k] * variances[k] for k in range(len(variances)))
    return layer.weight.view(keep) * (x - mu) / torch.sqrt(sigma2 + layer.eps) + layer.bias.view(keep)


@pytest.mark.parametrize("dims,shape", [(1, (4, 5, 11)), (2, (4, 5, 6, 7)), (3, (3, 4, 3, 4, 5))])
def test_mixed_lambda_in_training_is_the_softmax_mix_of_means_and_variances(dims: int, shape: tuple[int, ...]) -> None:
    layer, x = _mixed(SwitchNorm(shape[1], dims)), _spread_x(*shape)
    torch.testing.assert_close(layer(x), _direct_switch_norm(x, layer, None), atol=1e-5, rtol=1e-5)


def test_mixed_lambda_in_eval_uses_the_running_statistics_for_the_bn_branch() -> None:
    layer, x = _mixed(SwitchNorm(5, 2)), _spread_x(3, 5, 6, 6)
    with torch.no_grad():
        layer.running_mean.copy_(torch.linspace(-1.0, 2.0, 5))
        layer.running_var.copy_(torch.linspace(0.3, 4.0, 5))
    layer.eval()
    expected = _direct_switch_norm(x, layer, (layer.running_mean, layer.running_var))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_mixed_lambda_without_bn_mixes_in_and_ln_only() -> None:
    layer, x = _mixed(SwitchNorm(5, 2, using_bn=False)), _spread_x(3, 5, 6, 6)
    torch.testing.assert_close(layer(x), _direct_switch_norm(x, layer, None), atol=1e-5, rtol=1e-5)


def test_mixed_lambda_gradients_match_the_direct_formula() -> None:
    layer, x = _mixed(SwitchNorm(5, 2)), _spread_x(4, 5, 6, 6)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    (layer(x) * probe).sum().backward()
    got = [p.grad.clone() for p in (layer.mean_weight, layer.var_weight)]
    layer.zero_grad()
    (_direct_switch_norm(x, layer, None) * probe).sum().backward()
    for mine, direct in zip(got, (layer.mean_weight.grad, layer.var_weight.grad)):
        torch.testing.assert_close(mine, direct, atol=1e-4, rtol=1e-4)


def test_the_mixed_probe_tells_the_formula_from_near_misses() -> None:
    """The inputs above are discriminating: halving lambda or mixing standard deviations changes the output."""
    layer, x = _mixed(SwitchNorm(5, 2)), _spread_x(4, 5, 6, 6)
    spatial = (2, 3)
    means = [x.mean(spatial, keepdim=True), x.mean((1, 2, 3), keepdim=True), x.mean((0, 2, 3), keepdim=True)]
    variances = [x.var(d, keepdim=True, unbiased=False) for d in (spatial, (1, 2, 3), (0, 2, 3))]
    w_var = torch.softmax(layer.var_weight.detach(), 0)
    mixed_var = sum(w_var[k] * variances[k] for k in range(3))
    mixed_std = sum(w_var[k] * variances[k].sqrt() for k in range(3)) ** 2
    assert ((mixed_var - mixed_std).abs() / mixed_var).max() > 0.05
    assert (torch.softmax(layer.mean_weight.detach(), 0) - torch.softmax(layer.mean_weight.detach() / 2, 0)).abs().max() > 0.05
    assert max((m - means[0]).abs().max() for m in means[1:]) > 0.5
