"""client.prepare: foundation-layout pass-through and MSD/nnU-Net conversion (RAS, common spacing, one file per modality)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from client.case_files import discover_site
from client.data import DataError, load_site
from client.prepare import detect_layout, prepare_dataset, prepared_geometry
from simulations.cli import main
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


# ---------------------------------------------------------------- several modalities

SITES = (("site-a", RAS_3MM_Z, (16, 14, 6)), ("site-b", LPS_ISO, (12, 12, 10)))


def make_msd_modalities(root, *, form="files", n_cases=2):
    """The cases of ``make_msd`` with a second modality, the negated first: ``_0000``/``_0001`` files or one 4D file."""
    for site, affine, shape in SITES:
        for i in range(n_cases):
            image, label = _case(shape, i)
            if form == "files":
                _write(root / site / "imagesTr" / f"case{i}_0000.nii.gz", image, affine)
                _write(root / site / "imagesTr" / f"case{i}_0001.nii.gz", -image, affine)
            else:
                _write(root / site / "imagesTr" / f"case{i}.nii.gz", np.stack([image, -image], axis=-1), affine)  # (X, Y, Z, C)
            _write(root / site / "labelsTr" / f"case{i}.nii.gz", label, affine)
    return root


def _arrays(out, site, case):
    """(modality arrays, label array) of one prepared case."""
    images = sorted((out / site / "images").glob(f"{case}_*.nii.gz"))
    return [np.asarray(nib.load(p).dataobj) for p in images], np.asarray(nib.load(out / site / "labels" / f"{case}.nii.gz").dataobj)


def test_msd_two_modalities_are_resampled_alike(tmp_path):
    src = make_msd_modalities(tmp_path / "src")
    out = prepare_dataset(src, tmp_path / "out", spacing=(1.0, 1.0, 1.5))
    single = prepare_dataset(make_msd(tmp_path / "one"), tmp_path / "one-out", spacing=(1.0, 1.0, 1.5))
    for site, _, _ in SITES:
        assert sorted(p.name for p in (out / site / "images").iterdir()) == [f"case{i}_{c:04d}.nii.gz" for i in range(2) for c in range(2)]
        for i in range(2):
            for c in range(2):
                img = nib.load(out / site / "images" / f"case{i}_{c:04d}.nii.gz")
                lab = nib.load(out / site / "labels" / f"case{i}.nii.gz")
                assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and np.allclose(img.affine, lab.affine)
                np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.5))
            (m0, m1), label = _arrays(out, site, f"case{i}")
            reference = np.asarray(nib.load(single / site / "images" / f"case{i}.nii.gz").dataobj)
            np.testing.assert_allclose(m0, reference)  # modality 0: what a single-channel site gets
            np.testing.assert_allclose(m1, -m0)  # modality 1 through the same (linear) resampling
            np.testing.assert_array_equal(label, np.asarray(nib.load(single / site / "labels" / f"case{i}.nii.gz").dataobj))
    params = json.loads((out / "dataset.json").read_text())
    assert params["in_channels"] == 2 and params["num_classes"] == 3 and params["cases"]["site-a"] == ["case0", "case1"]
    found = discover_site(out / "site-a")  # the layout client.data reads
    assert found.in_channels == 2 and not found.rejected
    raw = load_site(out / "site-b", intensity="none")
    assert raw.in_channels == 2 and raw.n_rejected == 0
    for case in raw.train + raw.test:
        assert case.image.shape[0] == 2 and case.image[0].min() > 0  # channel order kept: modality 0 is the positive one
        np.testing.assert_allclose(case.image[1], -case.image[0])
    zscored = load_site(out / "site-b")
    np.testing.assert_allclose(zscored.train[0].image[1], -zscored.train[0].image[0], atol=1e-5)
    assert prepared_geometry(out / "site-a") == ("RAS", (1.0, 1.0, 1.5))


def test_msd_4d_file_per_case_matches_per_modality_files(tmp_path):
    files = prepare_dataset(make_msd_modalities(tmp_path / "files"), tmp_path / "files-out", spacing=(1.0, 1.0, 1.5))
    four_d = prepare_dataset(make_msd_modalities(tmp_path / "4d", form="4d"), tmp_path / "4d-out", spacing=(1.0, 1.0, 1.5))
    assert json.loads((four_d / "dataset.json").read_text())["in_channels"] == 2
    for site, _, _ in SITES:
        for i in range(2):
            (a0, a1), label_a = _arrays(files, site, f"case{i}")
            (b0, b1), label_b = _arrays(four_d, site, f"case{i}")
            np.testing.assert_allclose(b0, a0)
            np.testing.assert_allclose(b1, a1)
            np.testing.assert_array_equal(label_b, label_a)
    assert load_site(four_d / "site-a").in_channels == 2


def test_case_missing_a_modality_is_rejected_by_name(tmp_path, capsys):
    src = make_msd_modalities(tmp_path / "src", n_cases=3)
    (src / "site-a" / "imagesTr" / "case1_0001.nii.gz").unlink()
    out = tmp_path / "out"
    assert main(["prepare-data", "--src", str(src), "--out", str(out), "--spacing", "1", "1", "1.5"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "case1" in line]
    assert len(lines) == 1 and "site site-a" in lines[0] and "'case1'" in lines[0] and "_0001" in lines[0], captured.err
    assert "site-a (2), site-b (3)" in captured.out and "2 channel(s)" in captured.out
    assert sorted(p.name for p in (out / "site-a" / "labels").iterdir()) == ["case0.nii.gz", "case2.nii.gz"]
    assert not list((out / "site-a" / "images").glob("case1*"))
    assert len(list((out / "site-b" / "images").glob("case1_*"))) == 2  # the same name at another site is fine
    params = json.loads((out / "dataset.json").read_text())
    assert params["cases"]["site-a"] == ["case0", "case2"]
    assert [r["case"] for r in params["rejected"]["site-a"]] == ["case1"] and "site-b" not in params["rejected"]
    assert load_site(out / "site-a").in_channels == 2


def test_folder_layout_modalities_resampled_and_cached(tmp_path):
    src = tmp_path / "src"
    for i in range(2):
        image, label = _case((16, 14, 6), i)
        for c, values in enumerate((image, 2 * image)):
            _write(src / "x" / "images" / f"c{i}_{c:04d}.nii.gz", values, RAS_3MM_Z)
        _write(src / "x" / "labels" / f"c{i}.nii.gz", label, RAS_3MM_Z)
    assert prepare_dataset(src, tmp_path / "unused") == src.resolve()  # validated in place
    out = prepare_dataset(src, tmp_path / "out", spacing=(1.0, 1.0, 1.0))
    (m0, m1), _ = _arrays(out, "x", "c0")
    assert m0.shape == (16, 14, 16)
    np.testing.assert_allclose(m1, 2 * m0, rtol=1e-6)
    files = sorted(out.rglob("*.nii.gz"))
    assert len(files) == 6
    stamps = [f.stat().st_mtime_ns for f in files]
    assert prepare_dataset(src, out, spacing=(1.0, 1.0, 1.0)) == out
    assert [f.stat().st_mtime_ns for f in files] == stamps  # unchanged inputs: nothing rewritten
    (out / "x" / "images" / "c1_0001.nii.gz").unlink()  # an output file lost: rewritten
    prepare_dataset(src, out, spacing=(1.0, 1.0, 1.0))
    assert (out / "x" / "images" / "c1_0001.nii.gz").is_file()
