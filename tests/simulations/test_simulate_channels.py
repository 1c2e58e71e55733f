"""fedsite simulate on a two-modality folder dataset: in-channels from the data, HD95 in mm."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from simulations.cli import main

AFFINE = np.diag([0.5, 0.5, 1.0, 1.0])  # 0.5 mm pixels


def make_two_modality_sites(root, cases=6, size=16):
    """Two sites; the square is bright in modality 0 and dark in modality 1."""
    rng = np.random.default_rng(0)
    for s, site in enumerate(("a", "b")):
        for i in range(cases):
            label = np.zeros((size, size), np.uint8)
            x, y = rng.integers(2, size - 8, size=2)
            label[x : x + 6, y : y + 6] = 1
            for c, sign in enumerate((1.0, -1.0)):
                image = sign * label * (2.0 + s) + rng.normal(0, 0.3, size=label.shape)
                path = root / site / "images" / f"c{i}_{c:04d}.nii.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), path)
            (root / site / "labels").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(label, AFFINE), root / site / "labels" / f"c{i}.nii.gz")
    return root


def _config(tmp_path, data, model_extra=""):
    config = tmp_path / "exp.yaml"
    config.write_text(f"""
name: channels
data: {{dir: {data}}}
model: {{name: unet, channels: [4, 8], norm: batch{model_extra}}}
methods: [fedavg]
seeds: [0]
rounds: 1
batch-size: 2
device: cpu
""")
    return config


def test_explicit_in_channels_that_disagrees_is_one_line_error(tmp_path, capsys):
    data = make_two_modality_sites(tmp_path / "data")
    config = _config(tmp_path, data, ", in-channels: 1")
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in-channels 1" in err and "site a" in err and "2 channels" in err


@pytest.mark.slow
def test_two_modalities_train_and_report_hd95_in_mm(tmp_path):
    data = make_two_modality_sites(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(_config(tmp_path, data)), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert np.isfinite(run["mean_dice"]) and set(run["per_site"]) == {"a", "b"}
    assert "HD95 (mm)" in (out / "results.md").read_text()


@pytest.mark.slow
def test_a_site_without_a_valid_case_is_left_out_and_the_others_federate(tmp_path, capsys):
    data = make_two_modality_sites(tmp_path / "data", cases=4)
    for site, kind in (("c", "images"), ("c", "labels")):
        (data / site / kind).mkdir(parents=True)
    (data / "c" / "images" / "c0_0000.nii.gz").write_bytes(b"truncated")
    (data / "c" / "labels" / "c0.nii.gz").write_bytes(b"truncated")
    out = tmp_path / "out"
    main(["simulate", "--config", str(_config(tmp_path, data)), "--out", str(out)])
    assert "site c left out of the plan" in capsys.readouterr().err
    federation = json.loads(next((out / "runs").glob("*/federation.json")).read_text())
    assert federation["sites"] == ["a", "b"] and set(federation["per_site"]) == {"a", "b"}
    (reason,) = federation["left_out"].values()
    assert "site c" in reason and "no valid case" in reason
