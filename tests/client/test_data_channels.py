"""client.data: multi-channel sites (nnU-Net _0000/_0001 files or one 4D file per case), spacing per case."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.data import DataError, clear_cache, load_site, resolve_in_channels, site_in_channels


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def _save(path: Path, array, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return path


def make_modalities(root: Path, n_cases=3, channels=2, shape=(8, 8, 8), affine=None) -> Path:
    """Channel c of every case is constant 100 * (c + 1) plus noise: the channel order is visible."""
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        for c in range(channels):
            image = 100.0 * (c + 1) + rng.normal(0, 1, size=shape)
            _save(root / "images" / f"case{i}_{c:04d}.nii.gz", image.astype(np.float32), affine)
        label = np.zeros(shape, np.uint8)
        label[2:5, 2:5, 2:5] = 1
        _save(root / "labels" / f"case{i}.nii.gz", label, affine)
    return root


def test_per_modality_files_stack_in_channel_order(tmp_path):
    site = make_modalities(tmp_path / "s", channels=3)
    data = load_site(site, intensity="none")
    assert data.in_channels == 3 and data.n_rejected == 0
    for case in data.train + data.test:
        assert case.image.shape == (3, 8, 8, 8) and case.label.shape == (1, 8, 8, 8)
        np.testing.assert_allclose(case.image.mean(axis=(1, 2, 3)), [100, 200, 300], atol=1)


def test_zscore_is_per_channel(tmp_path):
    data = load_site(make_modalities(tmp_path / "s", channels=2))
    image = data.train[0].image
    np.testing.assert_allclose(image.mean(axis=(1, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(image.std(axis=(1, 2, 3)), 1, atol=1e-3)


def test_one_4d_file_per_case(tmp_path):
    site = tmp_path / "s"
    for i in range(2):
        image = np.stack([np.full((6, 5, 4), 10.0 * (c + 1), np.float32) for c in range(2)], axis=-1)  # (X, Y, Z, C)
        _save(site / "images" / f"c{i}.nii.gz", image)
        _save(site / "labels" / f"c{i}.nii.gz", np.ones((6, 5, 4), np.uint8))
    data = load_site(site, intensity="none")
    assert data.in_channels == 2 and data.spatial_shape == (6, 5, 4)
    np.testing.assert_array_equal(data.train[0].image[:, 0, 0, 0], [10.0, 20.0])


def test_case_missing_a_modality_is_rejected_by_name(tmp_path):
    site = make_modalities(tmp_path / "s", n_cases=3, channels=2)
    (site / "images" / "case1_0001.nii.gz").unlink()
    data = load_site(site)
    assert data.in_channels == 2 and [r.case for r in data.rejected] == ["case1"]
    assert "case1" in data.rejected[0].reason and "_0001" in data.rejected[0].reason
    assert {c.name for c in data.train + data.test} == {"case0", "case2"}
    assert site_in_channels(tmp_path, ["s"]) == {"s": 2}


def test_modality_on_another_grid_is_rejected(tmp_path):
    site = make_modalities(tmp_path / "s", n_cases=3, channels=2)
    _save(site / "images" / "case2_0001.nii.gz", np.ones((8, 8, 8), np.float32), np.diag([2.0, 1.0, 1.0, 1.0]))
    data = load_site(site)
    assert [r.case for r in data.rejected] == ["case2"]
    assert str(site / "images" / "case2_0001.nii.gz") in data.rejected[0].reason and "affine" in data.rejected[0].reason


def test_spacing_comes_from_the_affine(tmp_path):
    affine = np.diag([0.8, 1.2, 3.0, 1.0])
    affine[:3, 3] = (10, -4, 7)
    data = load_site(make_modalities(tmp_path / "s", n_cases=2, channels=1, affine=affine))
    assert all(c.spacing == pytest.approx((0.8, 1.2, 3.0)) for c in data.train + data.test)


def test_resolve_in_channels_from_data_or_checked_spec():
    assert resolve_in_channels({"name": "unet"}, {"a": 2, "b": 2}) == 2
    assert resolve_in_channels({"name": "unet", "in-channels": 2}, {"a": 2, "b": 2}) == 2
    with pytest.raises(DataError, match=r"in-channels 1 but site a's images have 2 channels"):
        resolve_in_channels({"name": "unet", "in-channels": 1}, {"a": 2, "b": 2})
    with pytest.raises(DataError, match=r"site b has 1 image channels but site a has 2"):
        resolve_in_channels({"name": "unet"}, {"a": 2, "b": 1})
