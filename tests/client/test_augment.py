"""Training augmentation: seeded, labels stay labels, image and label move together, never at evaluation."""

import pytest
import torch

import client.trainer as trainer
from client.augment import Augmenter, augmentation
from client.refresh import refresh_statistics
from client.trainer import TrainSettings, evaluate_dice, train_local
from shared_models import build_model, partition
from shared_models.losses import segmentation_loss
from shared_models.partition import Policy


def _batch(n=16, size=24, dims=2):
    g = torch.Generator().manual_seed(0)
    shape = (n, 1) + (size,) * dims
    labels = torch.zeros(shape, dtype=torch.long)
    inner = (slice(None), slice(None)) + (slice(size // 4, 3 * size // 4),) * dims
    core = (slice(None), slice(None)) + (slice(size // 3, size // 2),) * dims
    labels[inner] = 1
    labels[core] = 2
    return labels.float() + 0.2 * torch.randn(shape, generator=g), labels


@pytest.mark.parametrize("dims", [2, 3])
def test_same_seed_same_batch_other_seed_other_batch(dims):
    images, labels = _batch(size=24 if dims == 2 else 12, dims=dims)
    a = Augmenter(dims, seed=3)(images, labels)
    b = Augmenter(dims, seed=3)(images, labels)
    c = Augmenter(dims, seed=4)(images, labels)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == images.shape and a[1].shape == labels.shape
    assert type(a[0]) is torch.Tensor and a[0].dtype == images.dtype and a[1].dtype == labels.dtype


@pytest.mark.parametrize("dims", [2, 3])
def test_labels_stay_in_the_label_set_after_spatial_transforms(dims):
    images, labels = _batch(n=32, size=24 if dims == 2 else 12, dims=dims)
    labels = labels * 2  # 0, 2, 4: any interpolation between classes would show as 1 or 3
    _, out = Augmenter(dims, seed=0)(images, labels)
    moved = [i for i in range(len(labels)) if not torch.equal(out[i], labels[i])]
    assert moved, "no sample was spatially transformed: the test would prove nothing"
    assert set(out.unique().tolist()) <= {0, 2, 4}


def test_image_and_label_move_together():
    _, labels = _batch(n=8)
    spatial = augmentation(2).transforms[0]
    spatial.prob = 1.0
    spatial.set_random_state(seed=0)
    moved = 0
    for y in labels:
        out = spatial({"image": y.float(), "label": y})
        agree = (out["image"].round().long() == out["label"].long()).float().mean()
        assert agree > 0.95
        moved += not torch.equal(out["label"].long(), y)
    assert moved >= 6  # a few of the small rotations and scalings leave no voxel's label changed


def test_augmentation_changes_intensities_only_of_the_image():
    images, labels = _batch(n=32)
    x, _ = Augmenter(2, seed=0)(images, labels)
    assert not torch.equal(x, images)


class _Recorder(Augmenter):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Recorder.made.append(self)


def test_training_augments_and_evaluation_never_does(monkeypatch):
    _Recorder.made = []
    monkeypatch.setattr(trainer, "Augmenter", _Recorder)
    monkeypatch.setattr(Augmenter, "__call__", lambda *a: pytest.fail("evaluation augmented a batch"))
    images, labels = _batch(n=8, size=16)
    model = build_model({"name": "unet", "channels": [4, 8], "norm": "batch", "out-channels": 3}, seed=0)
    evaluate_dice(model, images, labels, 3)
    refresh_statistics(model, images, partition(model, Policy.parse("fedbn")), 4, torch.device("cpu"))
    train_local(model, images, labels, TrainSettings(epochs=1, batch_size=4, augment=False), segmentation_loss())
    assert _Recorder.made == []
    with pytest.raises(pytest.fail.Exception, match="augmented"):
        train_local(model, images, labels, TrainSettings(epochs=1, batch_size=4), segmentation_loss())
    assert len(_Recorder.made) == 1
