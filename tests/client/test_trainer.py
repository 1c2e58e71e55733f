"""The local loop: NaN guard, FedProx pull, custom steps, and the scores it reports."""

import pytest
import torch
from monai.networks.utils import one_hot

from client.trainer import TrainingDivergedError, TrainSettings, evaluate_dice, hd95_per_class, resolve_device, train_local
from shared_models import build_model
from tests.helpers import toy_segmentation
from shared_models.losses import segmentation_loss
from shared_models.norms.bin import BatchInstanceNorm
from shared_models.norms.registry import NORM_TYPES, NormType, OptimRule, TensorRole

SPEC = {"name": "unet", "channels": [4, 8], "norm": "batch", "out-channels": 3}


def _data(n=8, size=16):
    return toy_segmentation(n, size, noise=0.1)


def test_non_finite_loss_is_refused_not_reported():
    images, labels = _data()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        # no augmentation: a rotation may carry the one NaN voxel out of view (site data with NaN is refused at loading)
        train_local(build_model(SPEC, seed=0), images, labels, TrainSettings(epochs=1, batch_size=4, augment=False), segmentation_loss())


def _distance_to(model, reference):
    return sum(((p - reference[k]) ** 2).sum().item() for k, p in model.named_parameters())


def test_fedprox_term_keeps_the_model_near_the_global_one():
    images, labels = _data()
    start = build_model(SPEC, seed=0)
    global_params = {k: v.detach().clone() for k, v in start.named_parameters()}
    distances = {}
    for mu in (0.0, 10.0):
        model = build_model(SPEC, seed=0)
        train_local(model, images, labels, TrainSettings(epochs=3, batch_size=4, lr=1e-2, proximal_mu=mu), segmentation_loss(), global_params)
        distances[mu] = _distance_to(model, global_params)
    assert distances[10.0] < distances[0.0]


def test_a_model_owned_training_step_is_used():
    images, labels = _data()
    model = build_model(SPEC, seed=0)
    calls = []

    def training_step(x, y, loss_fn, step):
        calls.append(len(x))
        loss = loss_fn(model(x), y)
        step(loss, clip_value=0.1)
        return loss.detach()

    model.training_step = training_step
    report = train_local(model, images, labels, TrainSettings(epochs=1, batch_size=4), segmentation_loss())
    assert calls == [4, 4] and report.steps == 2 and report.samples == 8


def test_perfect_prediction_scores_one_and_zero_distance():
    _, labels = _data()
    report_dice = hd95_per_class(one_hot(labels, 3), one_hot(labels, 3))
    assert report_dice == [0.0, 0.0]

    class Oracle(torch.nn.Module):
        def forward(self, x):
            return one_hot(x.round().long().clamp(0, 2), 3) * 10.0

    clean = labels.float()
    report = evaluate_dice(Oracle(), clean, labels, 3)
    assert report.dice == pytest.approx(1.0) and report.hd95 == pytest.approx(0.0) and report.n == 8


def test_hd95_counts_a_missed_class_as_the_image_diagonal():
    y = torch.zeros(2, 1, 20, 20, dtype=torch.long)
    y[:, :, 5:10, 5:10] = 1
    p = y.clone()
    p[1] = 0  # the second case misses class 1 entirely
    (hd,) = hd95_per_class(one_hot(p, 2), one_hot(y, 2))
    assert hd == pytest.approx((0.0 + (20**2 + 20**2) ** 0.5) / 2)


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == resolve_device("auto").type == "cuda"
        return
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


class _GatedNorm(torch.nn.Module):
    """A toy norm type: layer norm times a per-channel ``gain``, plus an ``offset``."""

    def __init__(self, channels):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(channels))
        self.offset = torch.nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, 1) * self.gain.view(1, -1, 1, 1) + self.offset.view(1, -1, 1, 1)


@pytest.fixture
def gated_norm_type(monkeypatch):
    """Declare the toy norm's optimizer rule (``gain`` frozen by lr x 0) and projection (``offset`` into +-0.01)."""
    projections = []

    def project(layer):
        projections.append(layer)
        layer.offset.clamp_(-0.01, 0.01)

    norm_type = NormType(_GatedNorm, {"*": TensorRole.AFFINE}, {"gain": OptimRule(lr_multiplier=0.0, weight_decay=0.0)}, project)
    monkeypatch.setitem(NORM_TYPES, _GatedNorm, norm_type)
    return projections


def _gated_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), _GatedNorm(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1))


@pytest.mark.parametrize("own_step", [False, True], ids=["plain", "model-owned-step"])
def test_every_step_applies_the_declared_groups_and_projection(gated_norm_type, own_step):
    """Any registered norm type, not one special case; also through a model's own two-step training_step."""
    images, labels = _data()
    model = _gated_model()
    if own_step:

        def training_step(x, y, loss_fn, step):
            step(loss_fn(model(x), y))
            loss = loss_fn(model(x), y)
            step(loss, clip_value=1.0)
            return loss.detach()

        model.training_step = training_step
    conv_before = model[0].weight.detach().clone()
    report = train_local(model, images, labels, TrainSettings(epochs=2, batch_size=4, lr=0.5, weight_decay=0.1), segmentation_loss())
    assert len(gated_norm_type) == report.steps * (2 if own_step else 1)  # one projection per optimizer step
    assert torch.equal(model[1].gain.detach(), torch.ones(4))  # its group: lr x 0, no decay
    assert float(model[1].offset.detach().abs().max()) == pytest.approx(0.01)  # pushed out, projected back
    assert not torch.equal(model[0].weight.detach(), conv_before)  # the rest trains at lr


def test_rho_of_bin_stays_in_the_unit_interval_at_a_huge_learning_rate(monkeypatch):
    """BIN's declared rule reaches the trainer's Adam (rho: lr x 10, no decay) and its clamp follows every step."""
    optimizers = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    images, labels = _data()
    model = build_model({**SPEC, "norm": "bin"}, seed=0)
    layers = [m for m in model.modules() if isinstance(m, BatchInstanceNorm)]
    settings = TrainSettings(epochs=2, batch_size=4, lr=1.0, weight_decay=0.1, schedule="constant")  # the groups' base rates
    train_local(model, images, labels, settings, segmentation_loss())
    (optimizer,) = optimizers
    (rho_group,) = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} == {id(m.rho) for m in layers}]
    assert rho_group["lr"] == pytest.approx(10.0) and rho_group["weight_decay"] == 0.0
    assert all(g["lr"] == 1.0 and g["weight_decay"] == 0.1 for g in optimizer.param_groups if g is not rho_group)
    rhos = torch.cat([m.rho.detach() for m in layers])
    assert ((rhos >= 0) & (rhos <= 1)).all()
    assert ((rhos == 0) | (rhos == 1)).any()  # the steps did push rho out; the clamp brought it back


def test_per_case_dice_is_the_table_the_site_score_averages():
    """The site's per-class Dice is the mean over cases where the class is present; per_case keeps that table."""
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (5, 1, 12, 12))
    labels[0][labels[0] == 2] = 1  # case 0 has no class 2: its cell is NaN and ignored

    class Noisy(torch.nn.Module):
        def forward(self, x):
            noisy = torch.where(torch.rand_like(x) < 0.3, torch.randint_like(x, 0, 3), x)
            return one_hot(noisy.long(), 3) * 10.0

    report = evaluate_dice(Noisy(), labels.float(), labels, 3, with_hd95=False)
    table = torch.tensor(report.per_case)
    assert table.shape == (5, 2) and torch.isnan(table[0, 1]) and not torch.isnan(table[1:]).any()
    assert torch.nanmean(table, dim=0).tolist() == pytest.approx(list(report.per_class))
