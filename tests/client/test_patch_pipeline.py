"""client.patch_pipeline / client.patch_eval: patches from a disk cache, sliding-window scoring, per-case rejection."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from client.data import DataError, clear_cache
from client.patch_eval import evaluate_windows, window_logits
from client.patch_pipeline import CACHE_DIR, PATCHES_PER_CASE, PatchBatches, PipelineSpec, patch_site
from client.trainer import evaluate_dice

SHAPE = (20, 18, 16)
BOX = (slice(6, 11), slice(5, 10), slice(4, 8))


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)


def _site(root: Path, n: int = 4, channels: int = 1, affine=None, seed: int = 0) -> Path:
    """``n`` volumes with a labelled box, ``channels`` modalities as case_000C files."""
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    for i in range(n):
        label = np.zeros(SHAPE, np.uint8)
        label[BOX] = 1
        for c in range(channels):
            image = rng.normal(size=SHAPE).astype(np.float32) + 3.0 * label * (c + 1)
            name = f"c{i}_{c:04d}.nii.gz" if channels > 1 else f"c{i}.nii.gz"
            _save(root / "images" / name, image, affine)
        _save(root / "labels" / f"c{i}.nii.gz", label, affine)
    return root


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def test_patches_have_the_patch_shape_and_half_are_centred_on_foreground(tmp_path):
    site = patch_site(_site(tmp_path / "s", n=6), PipelineSpec(patch=(8, 8, 8)), tmp_path / "state", test_fraction=0.0)
    source = PatchBatches(site, batch_size=4, seed=0)
    assert source.steps_per_epoch == 3  # 6 cases, 2 cases (4 patches) per batch
    batches = list(source.epoch())
    x, y = batches[0]
    assert x.shape == (4, 1, 8, 8, 8) and y.shape == (4, 1, 8, 8, 8) and y.dtype == torch.int64
    assert len(batches) == 3 and sum(len(xb) for xb, _ in batches) == 6 * PATCHES_PER_CASE
    many = [yb for _ in range(10) for _, yb in source.epoch()]
    share = float(torch.cat([(yb > 0).flatten(1).any(1) for yb in many]).float().mean())
    assert share >= 0.45  # pos=1, neg=1: half the patches are centred on a foreground voxel


def test_the_same_seed_draws_the_same_patches_and_another_seed_others(tmp_path):
    site = patch_site(_site(tmp_path / "s"), PipelineSpec(patch=(8, 8, 8)), tmp_path / "state", test_fraction=0.0)
    first = [x for x, _ in PatchBatches(site, 4, seed=3).epoch()]
    again = [x for x, _ in PatchBatches(site, 4, seed=3).epoch()]
    other = [x for x, _ in PatchBatches(site, 4, seed=4).epoch()]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_cases_are_cached_on_disk_and_an_edited_file_is_read_again(tmp_path):
    root = _site(tmp_path / "s")
    spec = PipelineSpec(patch=(8, 8, 8))
    site = patch_site(root, spec, tmp_path / "state")
    cached = list((tmp_path / "state" / CACHE_DIR).rglob("*.pt"))
    assert len(cached) == 4
    assert patch_site(root, spec, tmp_path / "state") is site  # memoised while the files are unchanged
    label = np.zeros(SHAPE, np.uint8)
    label[2:4, 2:4, 2:4] = 2
    _save(root / "labels" / "c0.nii.gz", label, np.diag([2.0, 2.0, 3.0, 1.0]))
    edited = patch_site(root, spec, tmp_path / "state")
    assert edited.num_classes == 3 and len(list((tmp_path / "state" / CACHE_DIR).rglob("*.pt"))) == 5


def test_a_case_whose_label_affine_differs_is_rejected_naming_both_files_and_the_rest_trains(tmp_path):
    root = _site(tmp_path / "s", n=4)
    label = nib.load(root / "labels" / "c2.nii.gz")
    _save(root / "labels" / "c2.nii.gz", np.asarray(label.dataobj), np.diag([2.0, 2.0, 5.0, 1.0]))
    site = patch_site(root, PipelineSpec(patch=(8, 8, 8)), tmp_path / "state")
    assert [r.case for r in site.rejected] == ["c2"]
    assert "c2.nii.gz" in site.rejected[0].reason and str(root / "labels" / "c2.nii.gz") in site.rejected[0].reason
    assert len(site.train) + len(site.test) == 3
    assert next(PatchBatches(site, 2, 0).epoch())[0].shape[2:] == (8, 8, 8)


def test_a_site_without_a_usable_case_names_the_site(tmp_path):
    root = _site(tmp_path / "broken", n=1)
    (root / "images" / "c0.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="site broken .*no valid case"):
        patch_site(root, PipelineSpec(patch=(8, 8, 8)), tmp_path / "state")


def test_modalities_stack_as_channels_and_are_normalised_each(tmp_path):
    site = patch_site(_site(tmp_path / "s", channels=2), PipelineSpec(patch=(8, 8, 8)), tmp_path / "state")
    assert site.in_channels == 2
    image = site.cases[site.train[0]]["image"]
    assert image.shape == (2, *SHAPE)
    assert torch.allclose(image.flatten(1).mean(1), torch.zeros(2), atol=1e-4)
    assert torch.allclose(image.flatten(1).std(1, correction=0), torch.ones(2), atol=1e-3)


def test_cases_are_reoriented_to_ras_and_resampled_to_the_target_spacing(tmp_path):
    flipped = np.diag([-2.0, 2.0, 3.0, 1.0])
    flipped[0, 3] = 2.0 * (SHAPE[0] - 1)
    site = patch_site(_site(tmp_path / "s", affine=flipped), PipelineSpec(patch=(8, 8, 8), spacing=(2.0, 2.0, 1.5)),
                      tmp_path / "state", test_fraction=0.0)
    case = site.cases[0]
    assert tuple(case["spacing"].tolist()) == (2.0, 2.0, 1.5)
    assert case["image"].shape[1:] == (20, 18, 31)  # 16 slices of 3 mm -> 31 of 1.5 mm
    box_x = np.flatnonzero(case["label"][0].numpy().any(axis=(1, 2)))
    assert (box_x.min(), box_x.max()) == (SHAPE[0] - 11, SHAPE[0] - 7)  # the x axis was flipped into RAS


class _Local(nn.Module):
    """A translation-equivariant network with a 3x3x3 receptive field: windows cannot change its output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_one_window_covering_the_image_equals_whole_image_inference(tmp_path):
    site = patch_site(_site(tmp_path / "s", n=4), PipelineSpec(patch=SHAPE), tmp_path / "state")
    model = _Local().eval()
    case = site.cases[site.test[0]]
    windowed = window_logits(model, case["image"], SHAPE, torch.device("cpu"))
    with torch.no_grad():
        whole = model(case["image"][None])
    assert torch.allclose(windowed, whole, atol=1e-6)
    images = torch.stack([site.cases[i]["image"] for i in site.test])
    labels = torch.stack([site.cases[i]["label"] for i in site.test]).long()
    spacing = [tuple(site.cases[i]["spacing"].tolist()) for i in site.test]
    reference = evaluate_dice(model, images, labels, 2, spacing=spacing)
    scored = evaluate_windows(model, site, site.test)
    assert scored.dice == pytest.approx(reference.dice) and scored.hd95 == pytest.approx(reference.hd95)
    assert np.allclose(scored.per_case, reference.per_case)


def test_overlapping_windows_blend_to_the_whole_image_output_of_a_local_network(tmp_path):
    site = patch_site(_site(tmp_path / "s", n=4), PipelineSpec(patch=(8, 8, 8)), tmp_path / "state")
    model = _Local().eval()
    case = site.cases[site.test[0]]
    with torch.no_grad():
        whole = model(case["image"][None])
    windowed = window_logits(model, case["image"], (8, 8, 8), torch.device("cpu"))
    assert windowed.shape == whole.shape
    # windows pad their own borders with zeros, so only the Gaussian-weighted blend keeps the seams small
    assert (windowed.argmax(1) == whole.argmax(1)).float().mean() > 0.95
    assert (windowed - whole).abs().mean() < 0.1 * whole.abs().mean()
