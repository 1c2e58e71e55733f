"""fedsite simulate on 3D sites that differ in spacing and orientation: patches, the plan's grid, HD95 in mm."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from simulations.cli import main

SHAPE = (24, 22, 12)


def _affine(spacing, flip_x=False):
    affine = np.diag([*spacing, 1.0])
    if flip_x:
        affine[0, 0] = -spacing[0]
        affine[0, 3] = spacing[0] * (SHAPE[0] - 1)
    return affine


def make_3d_sites(root, cases=5):
    """Site a: 2 mm RAS; b: 2x2x4 mm (half the slices); c: 2 mm with a flipped x axis; b's last case mislabelled."""
    rng = np.random.default_rng(0)
    geometry = {"a": ((2.0, 2.0, 2.0), False, SHAPE), "b": ((2.0, 2.0, 4.0), False, (*SHAPE[:2], SHAPE[2] // 2)),
                "c": ((2.0, 2.0, 2.0), True, SHAPE)}
    for site, (spacing, flip, shape) in geometry.items():
        for i in range(cases):
            label = np.zeros(shape, np.uint8)
            x, y = rng.integers(3, 12, size=2)
            label[x : x + 8, y : y + 8, 1 : shape[2] - 1] = 1
            image = (label * 2.0 + rng.normal(0, 0.5, size=shape)).astype(np.float32) * (1.0 + 0.5 * "abc".index(site))
            label_affine = _affine(spacing, flip)
            if site == "b" and i == cases - 1:
                label_affine = _affine((2.0, 2.0, 3.0))
            for kind, array, affine in (("images", image, _affine(spacing, flip)), ("labels", label, label_affine)):
                (root / site / kind).mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(array, affine), root / site / kind / f"c{i}.nii.gz")
    return root


@pytest.mark.slow
def test_3d_sites_train_on_patches_and_report_hd95_in_mm_with_the_mislabelled_case_left_out(tmp_path):
    data = make_3d_sites(tmp_path / "hospitals")
    out = tmp_path / "out"
    rc = main(["simulate", "--data", str(data), "--methods", "fedbn", "--seeds", "0", "--rounds", "2", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["applied"]["patch_size"] and len(plan["applied"]["patch_size"]) == 3
    assert plan["applied"]["target_spacing"] == [2.0, 2.0, 2.0]
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert set(run["per_site"]) == {"a", "b", "c"}
    assert all(np.isfinite(site["dice"]) and site["dice"] > 0 for site in run["per_site"].values())
    report = (out / "results.md").read_text()
    assert "HD95 (mm)" in report and "hospitals-3d" in report
    caches = list((out / "runs").rglob("case-cache/*/*.pt"))
    assert caches, "the sites read their cases through the disk cache"

    (cell,) = (out / "runs").iterdir()
    scan = data / "c" / "images" / "c0.nii.gz"  # site c stores its scans with a flipped x axis
    assert main(["predict", "--run-dir", str(cell), "--site", "c", "--input", str(scan), "--output", str(tmp_path / "c0.nii.gz")]) == 0
    written, ref = nib.load(tmp_path / "c0.nii.gz"), nib.load(scan)
    assert written.shape == ref.shape and np.allclose(written.affine, ref.affine)
    assert main(["predict", "--run-dir", str(cell), "--site", "z", "--input", str(scan), "--output", str(tmp_path / "z.nii.gz")]) == 1
