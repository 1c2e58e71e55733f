"""DualNorm layer and DualNorm-UNet: the properties of methods.md §1.9, plus §1.4/§1.5 mechanics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared_models import build_model, partition
from shared_models.config import ConfigError
from shared_models.nets.dualnorm_unet import DualNormUNet, DualResBlock, dualnorm_block_paths, load_stage1_weights
from shared_models.norms import TensorRole
from shared_models.norms.dualnorm import DualNormLayer
from shared_models.partition import Policy

POLICIES = ("fedavg", "fedbn", "silobn", "local")
SMALL = {"name": "dualnorm_unet", "channels": [4, 8, 16, 32], "out-channels": 3}


def _soft_mask(n: int, k: int, *size: int) -> torch.Tensor:
    return torch.softmax(torch.randn(n, k, *size) * 2, dim=1)


def _randomize_heads(layer: DualNormLayer) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)


# ------------------------------------------------------------------ the layer


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("mask_size", [(4, 4), (8, 6), (16, 12), (33, 20)])
def test_layer_shape_for_any_mask_size(mode: str, mask_size: tuple[int, int]) -> None:
    layer = DualNormLayer(6, 3, 2, mask_mode=mode)
    x = torch.randn(2, 6, 16, 12)
    assert layer(x, _soft_mask(2, 3, *mask_size)).shape == x.shape


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_layer_shape_3d(mode: str) -> None:
    layer = DualNormLayer(4, 2, 3, mask_mode=mode)
    x = torch.randn(2, 4, 6, 8, 5)
    assert layer(x, _soft_mask(2, 2, 3, 4, 4)).shape == x.shape


def test_zero_heads_give_exactly_affine_free_batch_norm() -> None:
    layer = DualNormLayer(5, 3, 2, zero_init_heads=True)
    reference = nn.BatchNorm2d(5, affine=False)
    x = torch.randn(3, 5, 8, 8) * 2 + 1
    assert torch.equal(layer(x, _soft_mask(3, 3, 4, 4)), reference(x))
    torch.testing.assert_close(layer.bn.running_mean, reference.running_mean)
    layer.eval(), reference.eval()
    assert torch.equal(layer(x, _soft_mask(3, 3, 8, 8)), reference(x))


def test_spatially_constant_mask_is_an_ordinary_bn_on_the_interior() -> None:
    layer = DualNormLayer(4, 3, 2)
    _randomize_heads(layer)
    x = torch.randn(2, 4, 12, 10)
    probs = torch.tensor([0.2, 0.5, 0.3]).view(1, 3, 1, 1)
    mask = probs.expand(2, 3, 6, 5).contiguous()
    gamma, beta = layer.modulation(mask, x.shape[2:])
    inner = (..., slice(2, -2), slice(2, -2))
    gamma_c, beta_c = gamma[0, :, 6, 5], beta[0, :, 6, 5]
    torch.testing.assert_close(gamma[inner], gamma_c.view(1, 4, 1, 1).expand_as(gamma[inner]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(beta[inner], beta_c.view(1, 4, 1, 1).expand_as(beta[inner]), atol=1e-6, rtol=1e-6)
    assert (gamma[..., 0, 0] - gamma_c.view(1, 4)).abs().max() > 1e-4  # the border really differs
    expected = F.batch_norm(x, None, None, 1 + gamma_c, beta_c, training=True, eps=1e-5)
    torch.testing.assert_close(layer(x, mask)[inner], expected[inner], atol=1e-5, rtol=1e-5)


def test_two_region_mask_gives_region_dependent_affine() -> None:
    layer = DualNormLayer(4, 2, 2)
    _randomize_heads(layer)
    mask = torch.zeros(1, 2, 16, 16)
    mask[:, 0, :, :8] = 1.0
    mask[:, 1, :, 8:] = 1.0
    gamma, beta = layer.modulation(mask, (16, 16))
    left, right = (..., slice(2, -2), slice(2, 6)), (..., slice(2, -2), slice(10, -2))
    for t in (gamma, beta):
        torch.testing.assert_close(t[left], t[left][..., :1, :1].expand_as(t[left]), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(t[right], t[right][..., :1, :1].expand_as(t[right]), atol=1e-6, rtol=1e-6)
        assert (t[left][..., 0, 0] - t[right][..., 0, 0]).abs().max() > 1e-3


def test_hard_mode_keeps_a_low_resolution_one_hot_mask_one_hot() -> None:
    labels = torch.randint(0, 3, (2, 4, 5))
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    hard = DualNormLayer(4, 3, 2, mask_mode="hard").resize_mask(one_hot, (16, 20))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.sum(1), torch.ones(2, 16, 20))
    soft = DualNormLayer(4, 3, 2, mask_mode="soft").resize_mask(one_hot, (16, 20))
    assert ((soft > 0) & (soft < 1)).any()  # soft mode interpolates
    torch.testing.assert_close(soft[..., 0, 0], one_hot[..., 0, 0])  # aligned corners
    torch.testing.assert_close(soft[..., -1, -1], one_hot[..., -1, -1])


def test_dualnorm_layer_is_not_a_buildable_norm_but_is_partitioned() -> None:
    layer = nn.Sequential(DualNormLayer(4, 2, 2))
    split = partition(layer, "silobn")
    assert set(split.local) == {"0.bn.running_mean", "0.bn.running_var", "0.bn.num_batches_tracked"}
    assert all(split.roles[k] is TensorRole.MODULATION for k in split.shared)


# ------------------------------------------------------------------ the network


def test_block_names_map_onto_the_unet() -> None:
    assert dualnorm_block_paths(["inc", "down1", "down2", "down3"], 4) == [
        "inc",
        "downs.0.block",
        "downs.1.block",
        "downs.2.block",
    ]
    assert dualnorm_block_paths(["mid", "bottom", "up1", "up3"], 4) == ["downs.2.block", "ups.0.block", "ups.2.block"]
    with pytest.raises(ValueError):
        dualnorm_block_paths(["down4"], 4)
    with pytest.raises(ConfigError):
        build_model({**SMALL, "dualnorm-blocks": ["up9"]})
    model = build_model({**SMALL, "dualnorm-blocks": ["down1", "up1"]})
    assert isinstance(model.downs[0].block, DualResBlock) and isinstance(model.ups[0].block, DualResBlock)
    assert not isinstance(model.inc, DualResBlock)


def test_backbone_equals_the_plain_unet_with_the_same_seed() -> None:
    model = build_model(SMALL, seed=3)
    plain = build_model({**SMALL, "name": "unet"}, seed=3)
    own = model.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(own[key], value), key
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model.global_forward(x), plain(x))


def _dual_params(model: DualNormUNet) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".dual" in n}


def _dual_block_norm_params(model: DualNormUNet) -> dict[str, nn.Parameter]:
    paths = model.dualnorm_paths
    return {
        n: p for n, p in model.named_parameters() if any(n.startswith(f"{b}.norm") for b in paths)
    }


def test_without_mask_dualnorm_parameters_get_no_gradient() -> None:
    model = build_model(SMALL, seed=0).train()
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    assert _dual_params(model) and all(p.grad is None for p in _dual_params(model).values())
    assert all(p.grad is not None for p in _dual_block_norm_params(model).values())


def test_with_mask_the_replaced_norms_get_no_gradient() -> None:
    model = build_model(SMALL, seed=0).train()
    model(torch.randn(2, 1, 16, 16), _soft_mask(2, 3, 16, 16)).sum().backward()
    assert _dual_block_norm_params(model) and all(p.grad is None for p in _dual_block_norm_params(model).values())
    assert all(p.grad is not None for p in _dual_params(model).values())
    assert model.ups[0].block.norm0.weight.grad is not None  # blocks without DualNorm keep their norms


def test_pass_two_mask_is_detached() -> None:
    model = build_model(SMALL, seed=0).train()
    z1, z2 = model.dual_forward(torch.randn(2, 1, 16, 16))
    z1.retain_grad()
    z2.sum().backward()
    assert z1.grad is None
    # control: an attached mask would carry gradient back into z1
    z1b = model.global_forward(torch.randn(2, 1, 16, 16))
    z1b.retain_grad()
    model(torch.randn(2, 1, 16, 16), torch.softmax(z1b, 1)).sum().backward()
    assert z1b.grad is not None and z1b.grad.abs().sum() > 0


def _trained_a_little(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for _ in range(2):
            model.global_forward(torch.randn(4, 1, 16, 16))
            model.local_forward(torch.randn(4, 1, 16, 16), _soft_mask(4, 3, 16, 16))
    return model


def test_eval_is_deterministic_and_batch_independent() -> None:
    model = _trained_a_little(build_model(SMALL, seed=0).train()).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        both = model(x)
        assert torch.equal(both, model(x))
        torch.testing.assert_close(both[:1], model(x[:1]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both[1:], model(x[1:]), atol=1e-5, rtol=1e-5)
        z1, z2 = model.dual_forward(x)
        assert torch.equal(both, z2) and not torch.equal(z1, z2)  # eval forward(x) is pass 2
        model.stage = "baseline"
        assert torch.equal(model(x), z1)


def test_eval_forward_3d() -> None:
    spec = {**SMALL, "spatial-dims": 3, "channels": [2, 4], "dualnorm-blocks": ["inc", "down1", "up1"], "mask-mode": "hard"}
    model = build_model(spec, seed=0).eval()
    x = torch.randn(2, 1, 8, 8, 6)
    with torch.no_grad():
        assert model(x).shape == (2, 3, 8, 8, 6)
    model.train()
    assert model(x, _soft_mask(2, 3, 4, 4, 3)).shape == (2, 3, 8, 8, 6)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def test_training_step_dual_makes_two_steps_with_the_pre_step_mask() -> None:
    model = build_model(SMALL, seed=0).train()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    calls: list[float | None] = []

    def step(loss: torch.Tensor, clip_value: float | None = None) -> None:
        loss.backward()
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
        optimizer.step()
        optimizer.zero_grad()
        calls.append(clip_value)

    seen: list[torch.Tensor] = []
    original = model.local_forward

    def spy(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen.append(mask)
        return original(x, mask)

    model.local_forward = spy  # type: ignore[method-assign]
    images, labels = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16))
    loss = model.training_step(images, labels, _loss, step)
    assert calls == [None, 0.1]
    assert loss.dim() == 0 and not loss.requires_grad
    assert len(seen) == 1 and not seen[0].requires_grad
    torch.testing.assert_close(seen[0], torch.softmax(reference.global_forward(images), 1))
    assert not torch.equal(model.stem.weight, reference.stem.weight)


def test_training_step_baseline_is_one_clipped_step_of_pass_one() -> None:
    model = build_model({**SMALL, "stage": "baseline"}, seed=0).train()
    calls: list[tuple[float | None, bool]] = []

    def step(loss: torch.Tensor, clip_value: float | None = None) -> None:
        loss.backward()
        calls.append((clip_value, all(p.grad is None for p in _dual_params(model).values())))

    model.training_step(torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16)), _loss, step)
    assert calls == [(0.1, True)]
    with pytest.raises(ValueError):
        model.stage = "triple"


def test_load_stage1_weights_is_non_strict_and_shape_matched() -> None:
    plain = build_model({**SMALL, "name": "unet"}, seed=5)
    model = build_model(SMALL, seed=9)
    dual_before = {k: v.clone() for k, v in model.state_dict().items() if ".dual" in k}
    state = dict(plain.state_dict())
    state["head.weight"] = torch.zeros(7, 4, 1, 1)  # wrong shape: skipped
    state["extra.weight"] = torch.zeros(1)
    report = load_stage1_weights(model, state)
    assert "head.weight" in report.shape_mismatch and "extra.weight" in report.not_in_model
    assert set(report.kept) == set(dual_before) | {"head.weight"}
    for key in report.loaded:
        assert torch.equal(model.state_dict()[key], plain.state_dict()[key])
    for key, value in dual_before.items():
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize("policy", POLICIES)
def test_partition_covers_dualnorm_unet(policy: str) -> None:
    model = build_model(SMALL, seed=0)
    split = partition(model, policy)
    keys = set(model.state_dict())
    assert set(split.shared) | set(split.local) == keys and not set(split.shared) & set(split.local)
    inner_stats = {k for k in keys if ".dual" in k and ".bn." in k}
    outer_stats = {k for k in keys if k.startswith("inc.norm0.running") or k.startswith("inc.norm1.running")}
    modulation = {k for k in keys if ".dual" in k and ".bn." not in k}
    assert inner_stats and outer_stats and modulation
    assert all(split.roles[k] is TensorRole.STATISTIC for k in inner_stats | outer_stats)
    assert all(split.roles[k] is TensorRole.MODULATION for k in modulation)
    if policy in ("fedbn", "silobn", "local"):
        assert (inner_stats | outer_stats) <= set(split.local)
    if policy in ("fedavg", "fedbn", "silobn"):
        assert modulation <= set(split.shared)  # ordinary convs: averaged by default (§1.6)
    personalized = partition(model, Policy.parse("fedbn", {"modulation": "local"}))
    assert modulation <= set(personalized.local)


@pytest.mark.parametrize("norm", ["iln", "bin", "switchable"])
def test_partition_covers_dualnorm_unet_with_other_backbone_norms(norm: str) -> None:
    model = build_model({**SMALL, "channels": [4, 8], "dualnorm-blocks": ["inc", "mid", "up1"], "norm": norm}, seed=0)
    keys = set(model.state_dict())
    for policy in POLICIES:
        split = partition(model, policy)
        assert set(split.shared) | set(split.local) == keys and not set(split.shared) & set(split.local)
    assert {k for k in keys if ".dual" in k and ".bn." in k} <= set(partition(model, "silobn").local)
