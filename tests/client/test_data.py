"""client.data: reading, validation, deterministic splits and the per-process cache."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.data import (
    Case,
    DataError,
    SiteData,
    clear_cache,
    infer_num_classes,
    list_sites,
    load_cases,
    load_site,
    split_cases,
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), path)
    return path


def _label(shape, rng, num_classes=3) -> np.ndarray:
    label = rng.integers(0, num_classes, size=shape).astype(np.uint8)
    label.flat[: num_classes] = np.arange(num_classes)  # every class present
    return label


def make_site(root: Path, shapes, rng=None, num_classes=3, store_2d_as=None) -> Path:
    """A site folder with one case per shape; images in arbitrary scanner units."""
    rng = rng or np.random.default_rng(0)
    for i, shape in enumerate(shapes):
        image = (rng.normal(300.0, 40.0, size=shape)).astype(np.float32)
        label = _label(shape, rng, num_classes)
        if store_2d_as == "hw1":
            image, label = image[..., None], label[..., None]
        _save(root / "images" / f"case-{i:02d}.nii.gz", image)
        _save(root / "labels" / f"case-{i:02d}.nii.gz", label)
    return root


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("shape", [(12, 10), (8, 9, 7)])
def test_shapes_dtypes_and_zscore(tmp_path, shape):
    site = make_site(tmp_path / "s", [shape] * 4)
    data = load_site(site)
    assert isinstance(data, SiteData)
    assert data.spatial_dims == len(shape) and data.spatial_shape == shape
    assert data.num_classes == 3 and data.site == "s" and data.root == site.resolve()
    assert len(data.train) + len(data.test) == 4
    for case in data.train + data.test:
        assert isinstance(case, Case)
        assert case.image.dtype == np.float32 and case.image.shape == (1, *shape)
        assert case.label.dtype == np.int64 and case.label.shape == (1, *shape)
        assert abs(case.image.mean()) < 1e-4 and abs(case.image.std() - 1) < 1e-3
        assert not case.image.flags.writeable  # shared by every caller of the cache


def test_intensity_none_keeps_values(tmp_path):
    site = make_site(tmp_path / "s", [(6, 7)] * 2)
    (case, *_) = load_cases(site, intensity="none")
    raw = nib.load(site / "images" / "case-00.nii.gz").get_fdata()
    np.testing.assert_allclose(case.image[0], raw, rtol=1e-6)


def test_2d_stored_with_trailing_singleton(tmp_path):
    site = make_site(tmp_path / "s", [(91, 109)] * 2, store_2d_as="hw1")
    data = load_site(site)
    assert data.spatial_dims == 2 and data.spatial_shape == (91, 109)
    assert data.train[0].image.shape == (1, 91, 109)


def test_mixed_sizes_padded_to_max(tmp_path):
    site = make_site(tmp_path / "s", [(91, 109), (90, 111), (91, 109)])
    cases = load_cases(site)
    assert {c.image.shape for c in cases} == {(1, 91, 111)}
    padded = cases[0]  # 109 -> 111: one column of zeros on one side, image centred
    assert (padded.label[0, :, 0] == 0).all() or (padded.label[0, :, -1] == 0).all()
    data = load_site(site)
    assert data.spatial_shape == (91, 111)


def test_explicit_spatial_shape_pads_and_crops(tmp_path):
    site = make_site(tmp_path / "s", [(91, 109), (90, 111)])
    cases = load_cases(site, spatial_shape=(96, 100))
    assert {c.image.shape for c in cases} == {(1, 96, 100)}
    assert {c.label.shape for c in cases} == {(1, 96, 100)}
    with pytest.raises(DataError, match="spatial_shape"):
        load_cases(site, spatial_shape=(8, 8, 8))


# ---------------------------------------------------------------- split


def test_split_deterministic_disjoint_covering():
    names = [f"case-{i:03d}" for i in range(20)]
    train, test = split_cases(names, 0.25, 7)
    shuffled = list(np.random.default_rng(1).permutation(names))
    assert split_cases(shuffled, 0.25, 7) == (train, test)
    assert not set(train) & set(test) and sorted(train + test) == names
    assert len(test) == 5
    assert split_cases(names, 0.25, 8) != (train, test)  # the seed matters


def test_split_keeps_one_of_each():
    assert split_cases(["a", "b"], 0.01, 0) in ((["a"], ["b"]), (["b"], ["a"]))
    train, test = split_cases(["a", "b", "c"], 0.99, 0)
    assert len(train) == 1 and len(test) == 2
    assert split_cases(["a"], 0.5, 0) == (["a"], [])
    assert split_cases(["a", "b"], 0.0, 0) == (["a", "b"], [])


def test_load_site_split_matches_split_cases(tmp_path):
    site = make_site(tmp_path / "s", [(6, 6)] * 8)
    data = load_site(site, test_fraction=0.25, split_seed=3)
    train, test = split_cases([f"case-{i:02d}" for i in range(8)], 0.25, 3)
    assert [c.name for c in data.train] == train and [c.name for c in data.test] == test


# ---------------------------------------------------------------- classes, sites


def test_num_classes(tmp_path):
    make_site(tmp_path / "a", [(6, 6)] * 2, num_classes=3)
    make_site(tmp_path / "b", [(6, 6)] * 2, num_classes=5)
    _save(tmp_path / "notes" / "readme.nii.gz", np.zeros((2, 2), np.float32))  # no images/: not a site
    assert list_sites(tmp_path) == ["a", "b"]
    assert infer_num_classes(tmp_path) == 5
    assert infer_num_classes(tmp_path, sites=["a"]) == 3
    assert load_site(tmp_path / "a").num_classes == 3
    assert load_site(tmp_path / "a", num_classes=5).num_classes == 5


def test_no_sites(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        list_sites(tmp_path)


# ---------------------------------------------------------------- cache


def test_cache_returns_same_object_and_reloads_on_edit(tmp_path):
    site = make_site(tmp_path / "s", [(6, 6)] * 3)
    first = load_site(site)
    assert load_site(site) is first
    assert load_site(str(site)) is first  # key is the resolved path
    assert load_site(site, split_seed=1) is not first
    # arrays are stored once: the split views share the cases of load_cases
    by_name = {c.name: c for c in load_cases(site)}
    assert all(by_name[c.name] is c for c in first.train + first.test)

    path = site / "images" / "case-01.nii.gz"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "touch"
    touched = load_site(site)
    assert touched is not first

    _save(path, np.full((6, 6), 5.0, np.float32) + np.eye(6, dtype=np.float32))  # edit
    edited = load_site(site)
    case = next(c for c in edited.train + edited.test if c.name == "case-01")
    assert case.image[0, 0, 0] > case.image[0, 0, 1]  # diagonal is the bright part now


# ---------------------------------------------------------------- bad input


def _bad(tmp_path: Path, **kw) -> Path:
    return make_site(tmp_path / "bad", [(6, 6)] * 3, **kw)


def _expect(site: Path, fragment: str, **kw):
    """The whole site fails with a DataError containing ``fragment``."""
    with pytest.raises(DataError) as info:
        load_site(site, **kw)
    assert fragment in str(info.value), str(info.value)
    return info.value


def _rejected(site: Path, case: str, fragment: str, **kw) -> SiteData:
    """Only ``case`` is rejected, with a reason containing ``fragment``; the site goes on with the others."""
    data = load_site(site, **kw)
    assert data.n_rejected == 1 and [r.case for r in data.rejected] == [case], data.rejected
    assert fragment in data.rejected[0].reason and "\n" not in data.rejected[0].reason, data.rejected[0].reason
    assert case not in {c.name for c in data.train + data.test}
    assert len(data.train) + len(data.test) == 2
    return data


def test_missing_label(tmp_path):
    site = _bad(tmp_path)
    (site / "labels" / "case-01.nii.gz").unlink()
    _rejected(site, "case-01", str(site / "images" / "case-01.nii.gz"))


def test_label_without_image(tmp_path):
    site = _bad(tmp_path)
    (site / "images" / "case-02.nii.gz").unlink()
    _rejected(site, "case-02", str(site / "labels" / "case-02.nii.gz"))


def test_shape_mismatch(tmp_path):
    site = _bad(tmp_path)
    _save(site / "labels" / "case-01.nii.gz", np.zeros((6, 7), np.uint8))
    data = _rejected(site, "case-01", str(site / "labels" / "case-01.nii.gz"))
    assert str(site / "images" / "case-01.nii.gz") in data.rejected[0].reason


def test_affine_mismatch_names_both_files_and_is_logged(tmp_path, caplog):
    site = _bad(tmp_path)
    label = np.asarray(nib.load(site / "labels" / "case-01.nii.gz").dataobj)
    nib.save(nib.Nifti1Image(label, np.diag([1.0, 1.0, 2.0, 1.0])), site / "labels" / "case-01.nii.gz")
    with caplog.at_level("WARNING", logger="fedsite.data"):
        data = _rejected(site, "case-01", "affine")
    reason = data.rejected[0].reason
    assert str(site / "images" / "case-01.nii.gz") in reason and str(site / "labels" / "case-01.nii.gz") in reason
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1 and "site bad" in lines[0] and "case-01" in lines[0]


def test_affine_within_tolerance_is_accepted(tmp_path):
    site = _bad(tmp_path)
    label = np.asarray(nib.load(site / "labels" / "case-01.nii.gz").dataobj)
    affine = np.eye(4)
    affine[0, 3] = 1e-4
    nib.save(nib.Nifti1Image(label, affine), site / "labels" / "case-01.nii.gz")
    assert load_site(site).n_rejected == 0


def test_nan_voxel(tmp_path):
    site = _bad(tmp_path)
    image = np.ones((6, 6), np.float32)
    image[2, 3] = np.nan
    _save(site / "images" / "case-02.nii.gz", image)
    _rejected(site, "case-02", str(site / "images" / "case-02.nii.gz"))


@pytest.mark.parametrize("value", [2.5, -1.0])
def test_bad_label_value(tmp_path, value):
    site = _bad(tmp_path)
    label = np.zeros((6, 6), np.float32)
    label[1, 1] = value
    _save(site / "labels" / "case-00.nii.gz", label)
    _rejected(site, "case-00", str(site / "labels" / "case-00.nii.gz"))


def test_label_at_or_above_num_classes(tmp_path):
    site = _bad(tmp_path)  # labels 0..2 in every case
    _save(site / "labels" / "case-01.nii.gz", np.ones((6, 6), np.uint8))  # 0..1 only
    data = load_site(site, num_classes=2)
    assert [c.name for c in data.train + data.test] == ["case-01"] and data.n_rejected == 2
    assert all(">= num_classes=2" in r.reason and str(site / "labels") in r.reason for r in data.rejected)
    assert load_site(site, num_classes=3).n_rejected == 0
    make_site(tmp_path / "all3", [(6, 6)] * 2)  # every case has label 2: nothing left
    _expect(tmp_path / "all3", "site all3", num_classes=2)


def test_corrupt_file(tmp_path):
    site = make_site(tmp_path / "bad", [(40, 40)] * 3)
    path = site / "images" / "case-01.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated download
    _rejected(site, "case-01", str(path))
    path.write_bytes(gzip.compress(b"not a nifti header"))
    _rejected(site, "case-01", str(path))


def test_4d_image_not_matching_its_label(tmp_path):
    site = _bad(tmp_path)
    _save(site / "images" / "case-00.nii.gz", np.ones((6, 6, 2, 3), np.float32))
    _rejected(site, "case-00", str(site / "images" / "case-00.nii.gz"))


def test_symlink_outside_the_site_is_rejected(tmp_path):
    site = _bad(tmp_path)
    outside = _save(tmp_path / "elsewhere" / "x.nii.gz", np.ones((6, 6), np.float32))
    (site / "images" / "case-01.nii.gz").unlink()
    (site / "images" / "case-01.nii.gz").symlink_to(outside)
    data = _rejected(site, "case-01", "symlink pointing outside the site folder")
    assert str(outside) in data.rejected[0].reason
    inside = site / "images" / "case-02.nii.gz"  # a link within the site is fine
    (site / "images" / "case-01.nii.gz").unlink()
    (site / "images" / "case-01.nii.gz").symlink_to(inside)
    assert load_site(site).n_rejected == 0


def test_no_valid_case_fails_the_site(tmp_path):
    site = make_site(tmp_path / "allbad", [(6, 6)] * 2)
    for i in range(2):
        _save(site / "labels" / f"case-{i:02d}.nii.gz", np.full((6, 6), 0.5, np.float32))
    err = _expect(site, "site allbad")
    assert "no valid case" in str(err) and "2 rejected" in str(err)


def test_empty_and_malformed_sites(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    _expect(tmp_path / "empty", "empty")
    (tmp_path / "nolabels" / "images").mkdir(parents=True)
    _expect(tmp_path / "nolabels", str(tmp_path / "nolabels" / "labels"))
    _expect(tmp_path / "missing", str(tmp_path / "missing"))
