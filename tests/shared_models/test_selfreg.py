"""SelfReg-UNet regularisers (methods.md §3.6) and their training-step integration."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared_models import architecture_fingerprint, build_model
from shared_models.selfreg import (
    DEFAULT_WEIGHT,
    FeatureTap,
    SelfRegFeatures,
    SelfRegLoss,
    disable_selfreg,
    enable_selfreg,
    feature_modules,
    inter_loss,
    intra_loss,
    match_spatial,
    selfreg_term,
    selfreg_training_step,
)

UNET = {"name": "unet", "channels": [8, 16, 32, 64]}


def _identity_pairs(cs, ct, generator):
    k = min(cs, ct)
    return torch.arange(k), torch.arange(k)


def _sgd_step(model: nn.Module, lr: float = 0.01):
    """The trainer's contract: step(loss, clip_value=None) does backward + optimizer step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(loss: torch.Tensor, clip_value: float | None = None) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _batch(n: int = 2, size: int = 16):
    return torch.randn(n, 1, size, size), torch.randint(0, 2, (n, size, size))


# ----------------------------------------------------------------- inter
def test_inter_gives_no_gradient_to_the_teacher_and_some_to_the_student():
    student = torch.randn(2, 6, 8, 8, requires_grad=True)
    teacher = torch.randn(2, 4, 16, 16, requires_grad=True)
    inter_loss(student, teacher, torch.Generator().manual_seed(0)).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_inter_is_zero_for_identical_maps_with_identical_indices_and_positive_when_random():
    f = torch.randn(2, 8, 8, 8)
    assert inter_loss(f, f, sampler=_identity_pairs) == 0
    assert inter_loss(f, f, torch.Generator().manual_seed(0)) > 0


def test_inter_pairing_is_reproducible_with_a_seeded_generator():
    s, t = torch.randn(2, 8, 8, 8), torch.randn(2, 16, 8, 8)
    a = inter_loss(s, t, torch.Generator().manual_seed(5))
    b = inter_loss(s, t, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("student,teacher,expected", [((56, 56), (224, 224), (56, 56)), ((4, 6, 8), (8, 6, 4), (4, 6, 4))])
def test_spatial_matching_pools_the_larger_map(student, teacher, expected):
    s, t = match_spatial(torch.randn(1, 2, *student), torch.randn(1, 3, *teacher))
    assert tuple(s.shape[2:]) == tuple(t.shape[2:]) == expected


def test_spatial_matching_is_average_pooling():
    teacher = torch.randn(1, 3, 16, 16)
    _, pooled = match_spatial(torch.randn(1, 2, 4, 4), teacher)
    assert torch.allclose(pooled, F.avg_pool2d(teacher, 4))


# ----------------------------------------------------------------- intra
@pytest.mark.parametrize("channels", [8, 7])
def test_intra_is_invariant_to_channel_order(channels):
    f = torch.randn(2, channels, 6, 6)
    perm = torch.randperm(channels)
    assert torch.equal(intra_loss(f), intra_loss(f[:, perm]))


def test_intra_is_zero_when_the_ranked_halves_coincide():
    # +-1 maps with the same number of +1 have exactly equal scores (norm 4, sums exact);
    # three different ones, duplicated: a stable ranking puts equal maps in both halves
    base = torch.tensor([1.0] * 10 + [-1.0] * 6)
    maps = torch.stack([base[torch.randperm(16)] for _ in range(3)]).reshape(1, 3, 4, 4)
    assert not torch.equal(maps[0, 0], maps[0, 1])
    assert intra_loss(torch.cat([maps, maps], dim=1)) == 0
    assert intra_loss(torch.randn(1, 6, 4, 4)) > 0


def test_intra_sends_gradients_to_both_halves():
    f = torch.randn(2, 4, 5, 5, requires_grad=True)
    intra_loss(f).backward()
    assert (f.grad.abs().sum(dim=(0, 2, 3)) > 0).all()


def test_intra_of_a_single_channel_is_zero():
    assert intra_loss(torch.randn(2, 1, 4, 4)) == 0


# ----------------------------------------------------------------- total loss
def _features() -> SelfRegFeatures:
    return SelfRegFeatures(
        encoder=[torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)],
        decoder=[torch.randn(2, 16, 8, 8)],
        teacher=torch.randn(2, 8, 16, 16),
    )


def test_weight_zero_equals_the_baseline_loss_exactly():
    logits, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    loss = SelfRegLoss(F.cross_entropy, weight=0.0)
    assert torch.equal(loss(logits, labels, _features()), F.cross_entropy(logits, labels))


def test_total_is_base_plus_weighted_mean_of_terms():
    logits, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    feats = _features()
    total = SelfRegLoss(F.cross_entropy, weight=0.5, sampler=_identity_pairs)(logits, labels, feats)
    intra = (intra_loss(feats.encoder[0]) + intra_loss(feats.encoder[1])) / 2 + intra_loss(feats.decoder[0])
    inter = sum(inter_loss(f, feats.teacher, sampler=_identity_pairs) for f in [*feats.decoder, *feats.encoder]) / 3
    assert torch.allclose(total, F.cross_entropy(logits, labels) + 0.5 * (intra + inter))
    assert DEFAULT_WEIGHT == 0.015


# ----------------------------------------------------------------- taps and training step
def test_residual_unet_taps_have_the_paper_layout():
    model = build_model(UNET, seed=0)
    with FeatureTap(model) as tap:
        model(torch.randn(2, 1, 32, 32))
    feats = tap.features()
    assert [f.shape[1] for f in feats.encoder] == [16, 32, 64]
    assert [f.shape[1] for f in feats.decoder] == [32, 16]
    assert feats.teacher.shape == (2, 8, 32, 32)


@pytest.mark.parametrize("spec", [UNET, {"name": "segnetr", "channels": [8, 16, 32]}, {"name": "uxnet", "channels": [8, 16, 32]}])
def test_training_step_trains_leaves_no_hooks_and_no_inference_cost(spec):
    model = build_model(spec, seed=0).train()
    images, labels = _batch()
    before = copy.deepcopy(model.state_dict())
    loss = selfreg_training_step(model, images, labels, F.cross_entropy, _sgd_step(model))
    assert loss.dim() == 0 and not loss.requires_grad
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
    out = model.eval()(images)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 16, 16)


def test_training_step_adds_the_regulariser_to_the_base_loss():
    model = build_model(UNET, seed=0)
    images, labels = _batch()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        base = F.cross_entropy(reference(images), labels)
    loss = selfreg_training_step(model, images, labels, F.cross_entropy, lambda loss, clip_value=None: None, weight=1.0)
    assert loss > base
    loss0 = selfreg_training_step(model, images, labels, SelfRegLoss(F.cross_entropy, weight=0.0), lambda loss, clip_value=None: None)
    assert torch.equal(loss0, base)


def test_enable_selfreg_leaves_state_and_fingerprint_unchanged_and_is_reproducible():
    losses = []
    for _ in range(2):
        model = build_model(UNET, seed=0)
        keys, fingerprint = list(model.state_dict()), architecture_fingerprint(model)
        enable_selfreg(model, weight=0.1, seed=7)
        assert list(model.state_dict()) == keys and architecture_fingerprint(model) == fingerprint
        torch.manual_seed(0)
        images, labels = _batch()
        losses.append(model.training_step(images, labels, F.cross_entropy, _sgd_step(model)))
        clone = pickle.loads(pickle.dumps(model))  # ships to simulation workers
        assert clone.training_step.model is clone
    assert torch.equal(losses[0], losses[1])
    disable_selfreg(model)
    assert not hasattr(model, "training_step")


def test_enable_selfreg_refuses_to_replace_a_models_own_training_step():
    class Custom(nn.Module):
        def training_step(self, images, labels, loss_fn, step):
            raise AssertionError

        def selfreg_features(self):
            return [], [], self

    with pytest.raises(ValueError, match="training_step"):
        enable_selfreg(Custom())


def test_a_model_without_taps_is_rejected():
    with pytest.raises(TypeError, match="selfreg_features"):
        feature_modules(nn.Conv2d(1, 2, 1))


def test_selfreg_term_handles_empty_sets():
    feats = SelfRegFeatures(encoder=[torch.randn(1, 4, 4, 4)], decoder=[], teacher=torch.randn(1, 4, 8, 8))
    term = selfreg_term(feats, sampler=_identity_pairs)
    assert torch.isfinite(term) and term > 0
