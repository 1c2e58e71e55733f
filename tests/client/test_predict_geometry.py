"""fedsite predict: the site's preprocessing (RAS, prepared spacing) applied, labels written back in the input's grid."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from client.predict import _inputs, segment, write_label
from client.prepare import prepare_dataset, prepared_geometry

CUBE = (slice(1, 4), slice(2, 5), slice(4, 7))  # voxel position of the structure in the input's array
LABEL = 2


class Threshold(torch.nn.Module):
    """'Segments' by thresholding the (z-scored) first channel: bright -> LABEL, else background."""

    def forward(self, x):
        bright = x[:, :1]
        return torch.cat([torch.ones_like(bright), torch.full_like(bright, -10.0), bright], dim=1)


def _cube_image(path, affine, shape=(8, 8, 8)):
    image = np.zeros(shape, np.float32)
    image[CUBE] = 10.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), path)
    return path


RAS_2MM = np.diag([2.0, 2.0, 2.0, 1.0])
FLIPPED_X = np.array([[-2.0, 0, 0, 30.0], [0, 2.0, 0, -5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1.0]])


@pytest.mark.parametrize("affine", [RAS_2MM, FLIPPED_X], ids=["ras", "flipped-x"])
@pytest.mark.parametrize("geometry", [("RAS", (2.0, 2.0, 2.0)), ("RAS", (1.0, 1.0, 1.0)), ("RAS", (2.0, 3.0, 1.5)), None],
                         ids=["reorient-only", "1mm", "aniso", "none"])
def test_label_lands_at_the_input_voxels_in_the_input_grid(tmp_path, affine, geometry):
    src = _cube_image(tmp_path / "in" / "scan.nii.gz", affine)
    labels = segment(Threshold(), [src], "zscore", geometry=geometry, in_channels=1)
    out = tmp_path / "out" / "scan.nii.gz"
    write_label(labels, src, out)
    written, ref = nib.load(out), nib.load(src)
    assert written.shape == ref.shape and np.allclose(written.affine, ref.affine)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(ref.affine)
    expected = np.zeros(ref.shape, np.int16)
    expected[CUBE] = LABEL
    if geometry is not None and geometry[1] == (2.0, 3.0, 1.5):  # another grid: edges may move one voxel
        got = np.asarray(written.dataobj)
        assert set(np.unique(got)) == {0, LABEL}
        centre = np.argwhere(got == LABEL).mean(axis=0)
        np.testing.assert_allclose(centre, np.argwhere(expected == LABEL).mean(axis=0), atol=0.6)
    else:
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected)


def test_prepared_site_records_its_geometry(tmp_path):
    for i in range(2):
        _cube_image(tmp_path / "src" / "h1" / "imagesTr" / f"c{i}_0000.nii.gz", FLIPPED_X)
        label = np.zeros((8, 8, 8), np.uint8)
        label[CUBE] = 1
        (tmp_path / "src" / "h1" / "labelsTr").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(label, FLIPPED_X), tmp_path / "src" / "h1" / "labelsTr" / f"c{i}.nii.gz")
    out = prepare_dataset(tmp_path / "src", tmp_path / "prepared", spacing=(1.0, 1.5, 2.0))
    assert prepared_geometry(out / "h1") == ("RAS", (1.0, 1.5, 2.0))
    assert prepared_geometry(tmp_path / "src" / "h1") is None  # not made by prepare-data
    params = json.loads((out / "dataset.json").read_text())
    params["sites"] = ["other"]
    (out / "dataset.json").write_text(json.dumps(params))
    assert prepared_geometry(out / "h1") is None  # the marker is not about this site


def test_two_modalities_grouped_into_one_case(tmp_path):
    folder = tmp_path / "in"
    for c in range(2):
        _cube_image(folder / f"pat_{c:04d}.nii.gz", FLIPPED_X)
    _cube_image(folder / "other_0000.nii.gz", FLIPPED_X)
    _cube_image(folder / "other_0001.nii.gz", FLIPPED_X)
    pairs = _inputs(folder, tmp_path / "out", channels=2)
    assert pairs == [((folder / "other_0000.nii.gz", folder / "other_0001.nii.gz"), tmp_path / "out" / "other.nii.gz"),
                     ((folder / "pat_0000.nii.gz", folder / "pat_0001.nii.gz"), tmp_path / "out" / "pat.nii.gz")]
    single = _inputs(folder / "pat_0000.nii.gz", tmp_path / "one.nii.gz", channels=2)
    assert single == [((folder / "pat_0000.nii.gz", folder / "pat_0001.nii.gz"), tmp_path / "one.nii.gz")]
    labels = segment(Threshold(), pairs[1][0], "zscore", geometry=("RAS", (1.0, 1.0, 1.0)), in_channels=2)
    assert labels.shape == (8, 8, 8) and (labels[CUBE] == LABEL).all() and labels.sum() == LABEL * 27
    with pytest.raises(RuntimeError, match="2 channels, the model takes 3"):
        segment(Threshold(), pairs[1][0], "zscore", in_channels=3)


def test_fedsite_predict_uses_the_sites_prepared_geometry(tmp_path, capsys):
    """`fedsite predict` on a site whose data came from prepare-data: a flipped-x scan comes back in its own grid."""
    from argparse import Namespace

    from client.global_store import GlobalSnapshot, save_global
    from client.predict import run
    from shared_models import architecture_fingerprint, build_model

    spec = {"name": "unet", "spatial-dims": 3, "in-channels": 1, "out-channels": 2, "channels": [4, 8], "norm": "batch"}
    model = build_model(spec, seed=0)
    state = tmp_path / "state"
    save_global(state, GlobalSnapshot("r1", 1, spec, "fedavg", {}, architecture_fingerprint(model), model.state_dict(), "zscore"))
    site_dir = tmp_path / "prepared" / "h1"
    (site_dir / "images").mkdir(parents=True)
    (tmp_path / "prepared" / "dataset.json").write_text(json.dumps(
        {"format": "fedsite-prepared", "sites": ["h1"], "orientation": "RAS", "spacing": [1.0, 1.0, 1.0]}))
    config = tmp_path / "site.yaml"
    config.write_text(f"site-id: h1\nsuperlink: 127.0.0.1:9092\nroot-certificates: ca.pem\nauth-private-key: key\n"
                      f"data-dir: {site_dir}\nstate-dir: {state}\n")
    scan = _cube_image(tmp_path / "in" / "scan.nii.gz", FLIPPED_X, shape=(8, 6, 5))
    out = tmp_path / "out" / "scan.nii.gz"
    assert run(Namespace(site_config=config, input=scan, output=out, run=None, device="cpu")) == 0
    assert "RAS at (1.0, 1.0, 1.0) mm" in capsys.readouterr().out
    written = nib.load(out)
    assert written.shape == (8, 6, 5) and np.allclose(written.affine, FLIPPED_X)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}


@pytest.mark.parametrize("affine", [RAS_2MM, FLIPPED_X], ids=["ras", "flipped-x"])
def test_a_volume_larger_than_the_patch_is_segmented_by_windows_in_its_own_grid(tmp_path, affine):
    src = _cube_image(tmp_path / "in" / "big.nii.gz", affine, shape=(20, 18, 16))
    labels = segment(Threshold(), [src], "zscore", geometry=("RAS", (2.0, 2.0, 2.0)), in_channels=1, patch=(8, 8, 8))
    out = tmp_path / "out" / "big.nii.gz"
    write_label(labels, src, out)
    written, ref = nib.load(out), nib.load(src)
    assert written.shape == ref.shape and np.allclose(written.affine, ref.affine)
    expected = np.zeros(ref.shape, np.int16)
    expected[CUBE] = LABEL
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
