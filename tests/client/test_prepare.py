"""client.prepare: foundation-layout pass-through and MSD/nnU-Net conversion (RAS, common spacing)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from client.data import DataError, load_site
from simulations.cli import main
from client.prepare import detect_layout, prepare_dataset
from simulations.domain_shift import DEFAULT_PROFILES, generate_dataset

RAS_3MM_Z = np.diag([1.0, 1.0, 3.0, 1.0])  # thick slices
LPS_ISO = np.diag([-1.5, -1.5, 1.5, 1.0])  # flipped in x and y, isotropic
MARK = (1, 2, 1)  # voxel holding label 2, to follow through reorientation/resampling


def _write(path, array, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def _case(shape, seed):
    rng = np.random.default_rng(seed)
    image = (rng.random(shape) * 100 + 50).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[3:9, 3:9, 1:4] = 1
    label[MARK] = 2
    return image, label


def make_msd(root, *, naming="_0000"):
    """site-a: 3D (16, 14, 6) at (1, 1, 3) mm, RAS; site-b: (12, 12, 10) at 1.5 mm, LPS. Two cases each."""
    for site, affine, shape in (("site-a", RAS_3MM_Z, (16, 14, 6)), ("site-b", LPS_ISO, (12, 12, 10))):
        for i in range(2):
            image, label = _case(shape, i)
            _write(root / site / "imagesTr" / f"case{i}{naming}.nii.gz", image, affine)
            _write(root / site / "labelsTr" / f"case{i}.nii.gz", label, affine)
    return root


def _world(affine, voxel):
    return (affine @ np.array([*voxel, 1.0]))[:3]


def test_msd_3d_non_isotropic_to_given_spacing(tmp_path):
    src = make_msd(tmp_path / "src")
    assert detect_layout(src) == "msd"
    out = prepare_dataset(src, tmp_path / "out", spacing=(1.0, 1.0, 1.5))
    assert out == tmp_path / "out"
    for site, affine, shape in (("site-a", RAS_3MM_Z, (16, 14, 6)), ("site-b", LPS_ISO, (12, 12, 10))):
        for i in range(2):
            img = nib.load(out / site / "images" / f"case{i}.nii.gz")
            lab = nib.load(out / site / "labels" / f"case{i}.nii.gz")
            assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
            np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.5))
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            src_zooms = np.abs(np.diag(affine)[:3])
            extent_in, extent_out = (np.array(shape) - 1) * src_zooms, (np.array(img.shape) - 1) * np.array([1.0, 1.0, 1.5])
            assert np.all(np.abs(extent_out - extent_in) <= np.array([1.0, 1.0, 1.5])), (site, img.shape)
            values = np.asarray(lab.dataobj)
            assert lab.get_data_dtype() == np.uint8 and set(np.unique(values)) == {0, 1, 2}  # nearest: no new values
            # the marked voxel stays at the same place in the world (reorientation + resampling)
            marked = np.argwhere(values == 2).mean(axis=0)
            assert np.linalg.norm(_world(lab.affine, marked) - _world(affine, MARK)) <= 1.6, site
    params = json.loads((out / "dataset.json").read_text())
    assert params["spacing"] == [1.0, 1.0, 1.5] and params["spacing_from"] == "given" and params["num_classes"] == 3
    site = load_site(out / "site-a", test_fraction=0.5)  # client.data reads it (and z-scores it)
    assert site.spatial_dims == 3 and site.num_classes == 3 and site.spatial_shape == (16, 14, 11)


def test_msd_median_spacing_plain_names_and_cache(tmp_path):
    src = make_msd(tmp_path / "src", naming="")  # <case>.nii.gz images (original MSD naming)
    out = prepare_dataset(src, tmp_path / "out", layout="msd")
    spacing = json.loads((out / "dataset.json").read_text())["spacing"]
    np.testing.assert_allclose(spacing, np.median([[1, 1, 3], [1, 1, 3], [1.5, 1.5, 1.5], [1.5, 1.5, 1.5]], axis=0))
    np.testing.assert_allclose(nib.load(out / "site-b" / "images" / "case0.nii.gz").header.get_zooms(), spacing)
    files = sorted(out.rglob("*.nii.gz"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert prepare_dataset(src, out) == out
    assert [f.stat().st_mtime_ns for f in files] == stamps  # unchanged inputs: nothing rewritten
    prepare_dataset(src, out, spacing=(2.0, 2.0, 2.0))  # new parameters: rewritten
    np.testing.assert_allclose(nib.load(files[0]).header.get_zooms(), (2.0, 2.0, 2.0))


def test_msd_2d(tmp_path):
    src = tmp_path / "src"
    for i in range(2):
        image = np.random.default_rng(i).random((16, 12, 1)).astype(np.float32)
        label = np.zeros((16, 12, 1), np.uint8)
        label[4:8, 4:8, 0] = 1
        _write(src / "s" / "imagesTr" / f"c{i}_0000.nii.gz", image, np.diag([0.5, 2.0, 1.0, 1.0]))
        _write(src / "s" / "labelsTr" / f"c{i}.nii.gz", label, np.diag([0.5, 2.0, 1.0, 1.0]))
    out = prepare_dataset(src, tmp_path / "out", spacing=(1.0, 1.0))
    img = nib.load(out / "s" / "images" / "c0.nii.gz")
    assert img.ndim == 2 and abs(img.shape[0] - 8) <= 1 and abs(img.shape[1] - 23) <= 1
    assert load_site(out / "s").spatial_dims == 2


def test_folder_layout_is_validated_in_place(tmp_path):
    src = generate_dataset(tmp_path / "src", profiles=DEFAULT_PROFILES[:2], cases_per_site=2, size=(16, 16), seed=1)
    assert detect_layout(src) == "folder"
    assert prepare_dataset(src, tmp_path / "out") == src.resolve()
    assert not (tmp_path / "out").exists()  # nothing copied
    bad = src / "site-b" / "labels" / "case-001.nii.gz"
    _write(bad, np.full((16, 16), 2.5, np.float32), np.eye(4))
    with pytest.raises(DataError, match=str(bad)):
        prepare_dataset(src, tmp_path / "out")


def test_folder_layout_resampled_when_spacing_given(tmp_path):
    src = tmp_path / "src"
    for i in range(2):
        image, label = _case((16, 14, 6), i)
        _write(src / "x" / "images" / f"c{i}.nii.gz", image, RAS_3MM_Z)
        _write(src / "x" / "labels" / f"c{i}.nii.gz", label, RAS_3MM_Z)
    out = prepare_dataset(src, tmp_path / "out", layout="folder", spacing=(1.0, 1.0, 1.0))
    img = nib.load(out / "x" / "images" / "c0.nii.gz")
    assert img.shape == (16, 14, 16)
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.0))


def test_bad_inputs_are_named(tmp_path):
    src = make_msd(tmp_path / "src")
    extra = src / "site-a" / "imagesTr" / "case0_0001.nii.gz"
    _write(extra, np.zeros((16, 14, 6), np.float32), RAS_3MM_Z)
    with pytest.raises(DataError, match="site site-b has 1 image channels but site site-a has 2"):  # a tie goes to more channels
        prepare_dataset(src, tmp_path / "out")
    extra.unlink()

    orphan = src / "site-b" / "imagesTr" / "case9_0000.nii.gz"
    _write(orphan, np.zeros((12, 12, 10), np.float32), LPS_ISO)
    with pytest.raises(DataError, match=f"{orphan}: no label"):
        prepare_dataset(src, tmp_path / "out")
    orphan.unlink()

    label = src / "site-b" / "labelsTr" / "case1.nii.gz"
    _write(label, np.full((12, 12, 10), 0.5, np.float32), LPS_ISO)
    with pytest.raises(DataError, match=f"{label}: label values"):
        prepare_dataset(src, tmp_path / "out")
    _write(label, np.zeros((12, 12, 9), np.uint8), LPS_ISO)
    with pytest.raises(DataError, match=f"case1_0000.nii.gz: image shape .* differs from label {label}"):
        prepare_dataset(src, tmp_path / "out")
    _write(label, np.zeros((12, 12, 10), np.uint8), LPS_ISO)

    with pytest.raises(DataError, match="layout folder"):
        prepare_dataset(src, tmp_path / "out", layout="folder")
    with pytest.raises(DataError, match="must not be the source"):
        prepare_dataset(src, src / "site-a" / "converted")
    generate_dataset(src / "other", profiles=DEFAULT_PROFILES[:1], cases_per_site=1, size=(8, 8))
    (src / "site-c" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="mixes layouts"):
        prepare_dataset(src, tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", tmp_path / "out")


def test_cli(tmp_path, capsys):
    src = make_msd(tmp_path / "src")
    assert main(["prepare-data", "--src", str(src), "--out", str(tmp_path / "out"), "--spacing", "1", "1", "1.5"]) == 0
    assert "site-a (2)" in capsys.readouterr().out
    np.testing.assert_allclose(nib.load(tmp_path / "out" / "site-a" / "images" / "case0.nii.gz").header.get_zooms(), (1, 1, 1.5))
    assert main(["prepare-data", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "nope: source folder does not exist" in capsys.readouterr().err
