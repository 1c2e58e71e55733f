"""simulations.domain_shift: deterministic synthetic sites with a feature shift on shared anatomy."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from client.data import clear_cache, list_sites, load_site
from simulations.domain_shift import DEFAULT_PROFILES, ScannerProfile, generate_dataset, make_anatomy, render


@pytest.fixture(scope="module")
def dataset_2d(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("ds2d"), cases_per_site=6, seed=3)


def _arrays(out, site):
    files = sorted((out / site / "images").glob("*.nii.gz"))
    images = np.stack([np.asarray(nib.load(f).dataobj) for f in files])
    labels = np.stack([np.asarray(nib.load(out / site / "labels" / f.name).dataobj) for f in files])
    return images, labels


def test_deterministic(tmp_path, dataset_2d):
    again = generate_dataset(tmp_path / "again", cases_per_site=6, seed=3)
    other = generate_dataset(tmp_path / "other", cases_per_site=6, seed=4)
    for profile in DEFAULT_PROFILES:
        (i1, l1), (i2, l2) = _arrays(dataset_2d, profile.name), _arrays(again, profile.name)
        assert i1.tobytes() == i2.tobytes() and l1.tobytes() == l2.tobytes()
        assert not np.array_equal(l1, _arrays(other, profile.name)[1])


def test_all_classes_present_and_anatomy_per_site(dataset_2d):
    labels = {p.name: _arrays(dataset_2d, p.name)[1] for p in DEFAULT_PROFILES}
    for site, lab in labels.items():
        assert lab.dtype == np.uint8 and lab.shape == (6, 64, 64)
        for case in lab:
            assert set(np.unique(case)) == {0, 1, 2, 3}, site
    assert not np.array_equal(labels["site-a"], labels["site-b"])  # site-specific draws
    fractions = np.array([[(lab == k).mean() for k in range(4)] for lab in labels.values()])
    assert np.ptp(fractions, axis=0).max() < 0.1  # same anatomy distribution


def test_intensity_shift_between_sites(dataset_2d):
    means = {}
    for p in DEFAULT_PROFILES:
        images, labels = _arrays(dataset_2d, p.name)
        assert images.dtype == np.float32
        z = (images - images.mean(axis=(1, 2), keepdims=True)) / images.std(axis=(1, 2), keepdims=True)
        means[p.name] = [float(z[labels == k].mean()) for k in range(4)]
    assert means["site-a"][1] < means["site-a"][2]  # T1-like: structure brighter than body
    assert means["site-b"][1] > means["site-b"][2]  # inverted contrast
    assert means["site-a"][3] < means["site-a"][1] and means["site-b"][3] > means["site-b"][1]
    # even after per-image z-scoring, the class appearance differs a lot between sites
    spread = np.ptp(np.array(list(means.values())), axis=0)
    assert spread.max() > 1.0


def test_profile_effects():
    rng = np.random.default_rng(0)
    label = make_anatomy(rng, 2, (64, 64))
    sharp = ScannerProfile("sharp", (0.0, 0.5, 1.0, 0.2))
    blurred = ScannerProfile("blur", (0.0, 0.5, 1.0, 0.2), blur_sigma=1.5, resolution=0.5)
    units = ScannerProfile("units", (0.0, 0.5, 1.0, 0.2), scale=1000.0, offset=-50.0)
    a = render(label, sharp, np.random.default_rng(1))
    b = render(label, blurred, np.random.default_rng(1))
    c = render(label, units, np.random.default_rng(1))
    assert a.dtype == np.float32 and a.shape == label.shape
    assert np.abs(np.diff(b, axis=0)).mean() < 0.8 * np.abs(np.diff(a, axis=0)).mean()
    np.testing.assert_allclose(c, a * 1000.0 - 50.0, rtol=1e-4, atol=1e-2)
    with pytest.raises(ValueError, match="sharp"):
        render(np.full((8, 8), 4), sharp, rng)


def test_3d_shapes_and_readable(tmp_path):
    out = generate_dataset(tmp_path / "ds3d", cases_per_site=2, spatial_dims=3, size=(24, 20, 16))
    assert list_sites(out) == [p.name for p in DEFAULT_PROFILES]
    clear_cache()
    data = load_site(out / "site-c")
    assert data.spatial_dims == 3 and data.spatial_shape == (24, 20, 16) and data.num_classes == 4
    assert len(data.train) == 1 and len(data.test) == 1
    label = make_anatomy(np.random.default_rng(5), 3, (24, 20, 16))
    assert label.dtype == np.int64 and set(np.unique(label)) == {0, 1, 2, 3}


def test_readable_by_load_site(dataset_2d):
    clear_cache()
    for site in list_sites(dataset_2d):
        data = load_site(dataset_2d / site)
        assert data.spatial_shape == (64, 64) and data.num_classes == 4
        assert len(data.train) + len(data.test) == 6


def test_idempotent_and_dataset_json(tmp_path):
    out = generate_dataset(tmp_path / "ds", cases_per_site=3, num_classes=3, seed=1)
    files = sorted(out.rglob("*"))
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    assert generate_dataset(tmp_path / "ds", cases_per_site=3, num_classes=3, seed=1) == out
    assert {f: f.stat().st_mtime_ns for f in sorted(out.rglob("*"))} == mtimes

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["seed"] == 1 and meta["num_classes"] == 3 and meta["spatial_dims"] == 2
    assert meta["size"] == [64, 64] and meta["cases_per_site"] == 3
    assert meta["sites"] == [p.name for p in DEFAULT_PROFILES]
    assert meta["profiles"][1]["tissue_intensity"] == list(DEFAULT_PROFILES[1].tissue_intensity)

    # different parameters regenerate and leave no stale cases behind
    generate_dataset(out, cases_per_site=2, num_classes=3, seed=1)
    assert len(list((out / "site-a" / "images").glob("*.nii.gz"))) == 2
    assert json.loads((out / "dataset.json").read_text())["cases_per_site"] == 2
