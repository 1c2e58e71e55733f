"""HD95 in millimetres: each case's voxel spacing, the miss value as the image diagonal in mm."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.utils import one_hot

from client.trainer import evaluate_dice, hd95_per_class


def _slabs(dz: int, shape=(8, 8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: a one-voxel slab at z=2; prediction: the same slab moved ``dz`` voxels along z."""
    y = torch.zeros(1, 1, *shape, dtype=torch.long)
    y[..., 1:7, 1:7, 2] = 1
    p = torch.zeros_like(y)
    p[..., 1:7, 1:7, 2 + dz] = 1
    return p, y


def test_anisotropic_offset_along_z_by_hand():
    p, y = _slabs(2)
    # every surface voxel of one slab is exactly 2 voxels (along z) from the other: 2 x 3 mm
    assert hd95_per_class(one_hot(p, 2), one_hot(y, 2), [(1.0, 1.0, 3.0)]) == [pytest.approx(6.0)]
    assert hd95_per_class(one_hot(p, 2), one_hot(y, 2), [(3.0, 1.0, 1.0)]) == [pytest.approx(2.0)]  # x is coarse, not z
    assert hd95_per_class(one_hot(p, 2), one_hot(y, 2)) == [pytest.approx(2.0)]  # no spacing: voxels


def test_each_case_uses_its_own_spacing():
    p, y = _slabs(2)
    p2, y2 = torch.cat([p, p]), torch.cat([y, y])
    (hd,) = hd95_per_class(one_hot(p2, 2), one_hot(y2, 2), [(1.0, 1.0, 3.0), (1.0, 1.0, 1.0)])
    assert hd == pytest.approx((6.0 + 2.0) / 2)


def test_missed_class_is_the_image_diagonal_in_mm():
    y = torch.zeros(2, 1, 20, 10, dtype=torch.long)
    y[:, :, 5:10, 3:6] = 1
    p = y.clone()
    p[1] = 0  # the second case misses class 1 entirely
    (hd,) = hd95_per_class(one_hot(p, 2), one_hot(y, 2), [(0.5, 0.5), (2.0, 0.5)])
    assert hd == pytest.approx((0.0 + math.hypot(20 * 2.0, 10 * 0.5)) / 2)


def test_spacing_must_match_cases_and_axes():
    p, y = _slabs(1)
    with pytest.raises(ValueError, match="spacing"):
        hd95_per_class(one_hot(p, 2), one_hot(y, 2), [(1.0, 1.0)])


def test_evaluate_dice_reports_mm():
    p, y = _slabs(2)

    class Shifted(torch.nn.Module):
        """'Segments' the image by returning the prediction slab as logits."""

        def forward(self, x):
            return one_hot(p, 2) * 10.0

    report = evaluate_dice(Shifted(), y.float(), y, 2, spacing=[(1.0, 1.0, 3.0)])
    assert report.hd95 == pytest.approx(6.0) and report.dice == pytest.approx(0.0)
