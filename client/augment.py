"""Training-time augmentation of a site's batches: MONAI dictionary transforms, seeded.

Applied per sample of a training batch on CPU tensors, before they move to the
device; evaluation and statistics refresh never see it. Spatial: a small
rotation and scaling (image bilinear, label nearest, so labels stay in the
label set). No flips: left and right differ in anatomy. Intensity: scale,
shift, Gaussian noise and gamma contrast, with nnU-Net-like probabilities
(each sample gets a few of them, most of the time none spatial). The transforms'
random state comes from the round's seed, so a run is reproducible.
"""

from __future__ import annotations

import math

import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

ROTATION = math.radians(15.0)
SCALE = 0.1  # each axis scaled by 1 + U(-0.1, 0.1)


def augmentation(spatial_dims: int) -> Compose:
    """The transform chain for 2D or 3D samples of shape (C, *S) under keys ``image``/``label``."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"augmentation supports 2D and 3D images, got {spatial_dims} spatial dims")
    return Compose([
        RandAffined(keys=("image", "label"), prob=0.2, rotate_range=(ROTATION,) * (1 if spatial_dims == 2 else 3),
                    scale_range=(SCALE,) * spatial_dims, mode=("bilinear", "nearest"), padding_mode=("border", "zeros")),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.15),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.15),
        RandGaussianNoised(keys="image", std=0.1, prob=0.1),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.15, retain_stats=True),
    ])


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """MONAI's MetaTensor as the plain tensor the training loop works with."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


class Augmenter:
    """Augments (N, C, *S) image and (N, 1, *S) label batches sample by sample, from one seed."""

    def __init__(self, spatial_dims: int, seed: int):
        self.transform = augmentation(spatial_dims)
        self.transform.set_random_state(seed=seed % (2**32))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for x, y in zip(images, labels):
            out = self.transform({"image": x, "label": y})
            xs.append(_plain(out["image"]).to(images.dtype))
            ys.append(_plain(out["label"]).round().to(labels.dtype))
        return torch.stack(xs), torch.stack(ys)
