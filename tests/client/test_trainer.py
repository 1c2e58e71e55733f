"""The local loop: NaN guard, FedProx pull, custom steps, and the scores it reports."""

import pytest
import torch
from monai.networks.utils import one_hot

from client.trainer import TrainingDivergedError, TrainSettings, evaluate_dice, hd95_per_class, resolve_device, train_local
from shared_models import build_model
from shared_models.losses import segmentation_loss

SPEC = {"name": "unet", "channels": [4, 8], "norm": "batch", "out-channels": 3}


def _data(n=8, size=16):
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(n, 1, size, size, dtype=torch.long)
    labels[:, :, 4:12, 4:12] = 1
    labels[:, :, 6:9, 6:9] = 2
    images = labels.float() + 0.1 * torch.randn(n, 1, size, size, generator=g)
    return images, labels


def test_non_finite_loss_is_refused_not_reported():
    images, labels = _data()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        train_local(build_model(SPEC, seed=0), images, labels, TrainSettings(epochs=1, batch_size=4), segmentation_loss())


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
