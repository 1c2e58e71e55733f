"""simulations.anatomy: MNI152 tissue maps (shipped in nilearn's wheel) scanned by each site's profile."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("nilearn", reason="optional extra fedsite[anatomy]")  # skips only when nilearn cannot be imported

from client.data import load_site  # noqa: E402
from simulations.anatomy import generate_anatomy_dataset, make_case, render_soft, tissue_probabilities  # noqa: E402
from simulations.domain_shift import DEFAULT_PROFILES, render  # noqa: E402

PROFILES = DEFAULT_PROFILES[:2]  # site-a T1-like, site-b T2-like
KW = dict(profiles=PROFILES, cases_per_site=3, size=(32, 32), seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_anatomy_dataset(tmp_path_factory.mktemp("anat"), **KW)


def _arrays(out, site):
    files = sorted((out / site / "images").glob("*.nii.gz"))
    images = np.stack([np.asarray(nib.load(f).dataobj) for f in files])
    labels = np.stack([np.asarray(nib.load(out / site / "labels" / f.name).dataobj) for f in files])
    return images, labels


def test_tissue_probabilities_sum_to_one():
    probs = tissue_probabilities()
    assert probs.shape[0] == 4 and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert probs.min() >= 0 and (probs[1] > 0.5).any() and (probs[2] > 0.5).any() and (probs[3] > 0.5).any()


def test_labels_are_brain_tissue(dataset):
    params = json.loads((dataset / "dataset.json").read_text())
    assert params["class_names"] == ["background", "gray-matter", "white-matter", "csf"] and params["num_classes"] == 4
    all_labels = []
    for p in PROFILES:
        images, labels = _arrays(dataset, p.name)
        assert images.dtype == np.float32 and labels.dtype == np.uint8 and labels.shape == (3, 32, 32)
        for case in labels:
            assert {0, 1, 2} <= set(np.unique(case)) <= {0, 1, 2, 3}  # background, GM and WM in every case
            assert 0.1 < (case == 1).mean() and 0.05 < (case == 2).mean()
        assert not np.array_equal(labels[0], labels[1])  # random level + warp per case
        all_labels.append(labels)
    assert (np.concatenate(all_labels) == 3).any()  # CSF somewhere
    site = load_site(dataset / PROFILES[0].name, test_fraction=0.34)
    assert site.num_classes == 4 and site.spatial_dims == 2


def test_deterministic_and_idempotent(tmp_path, dataset):
    again = generate_anatomy_dataset(tmp_path / "again", **KW)
    for p in PROFILES:
        (i1, l1), (i2, l2) = _arrays(dataset, p.name), _arrays(again, p.name)
        assert i1.tobytes() == i2.tobytes() and l1.tobytes() == l2.tobytes()
    files = sorted(again.rglob("*.nii.gz"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert generate_anatomy_dataset(tmp_path / "again", **KW) == tmp_path / "again"
    assert [f.stat().st_mtime_ns for f in files] == stamps  # cached: nothing rewritten
    other = generate_anatomy_dataset(tmp_path / "other", **{**KW, "seed": 1})
    assert not np.array_equal(_arrays(other, "site-a")[1], _arrays(dataset, "site-a")[1])


def test_sites_differ_in_intensity(dataset):
    means = {}
    for p in PROFILES:
        images, labels = _arrays(dataset, p.name)
        z = (images - images.mean(axis=(1, 2), keepdims=True)) / images.std(axis=(1, 2), keepdims=True)
        means[p.name] = [float(z[labels == k].mean()) for k in range(3)]
    assert means["site-a"][2] > means["site-a"][1]  # T1-like: WM brighter than GM
    assert means["site-b"][2] < means["site-b"][1]  # T2-like: WM darker than GM
    assert abs(means["site-a"][2] - means["site-b"][2]) > 0.5  # same anatomy, different appearance


def test_soft_render_matches_render_on_one_hot():
    rng = np.random.default_rng(0)
    probs = make_case(rng, 2, (24, 24))
    label = probs.argmax(axis=0)
    one_hot = np.eye(4, dtype=np.float32)[label].transpose(2, 0, 1)
    for profile in DEFAULT_PROFILES:
        a = render_soft(one_hot, profile, np.random.default_rng(7))
        b = render(label, profile, np.random.default_rng(7))
        np.testing.assert_array_equal(a, b)


def test_3d_and_no_csf(tmp_path):
    out = generate_anatomy_dataset(tmp_path / "3d", profiles=PROFILES[:1], cases_per_site=1, spatial_dims=3, size=(16, 16, 16))
    _, labels = _arrays(out, "site-a")
    assert labels.shape == (1, 16, 16, 16) and {1, 2} <= set(np.unique(labels))
    out = generate_anatomy_dataset(tmp_path / "nocsf", profiles=PROFILES[:1], cases_per_site=1, size=(16, 16), include_csf=False)
    assert set(np.unique(_arrays(out, "site-a")[1])) <= {0, 1, 2}
    with pytest.raises(ValueError, match="spatial_dims"):
        generate_anatomy_dataset(tmp_path / "bad", spatial_dims=3, size=(16, 16))
