"""client.fingerprint: a site's summary is exact, aggregate-only, and survives a ConfigRecord."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flwr.app import ConfigRecord

from client.data import DataError
from client.fingerprint import site_fingerprint
from shared_models.protocol import FP_CLASSES, ProtocolError, SiteFingerprint

SPACING = (0.8, 1.5)


def _save(path: Path, array: np.ndarray, spacing=SPACING) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, *([1.0] * (3 - len(spacing))), 1.0])
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)


def _site(root: Path, shapes, seed=0, spacing=SPACING) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    """A site of random cases (2D stored as H x W x 1, as exports often are); returns the arrays too."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i, shape in enumerate(shapes):
        image = rng.normal(100.0, 15.0, size=shape).astype(np.float32)
        label = rng.choice([0, 0, 1, 3], size=shape).astype(np.uint8)  # class 2 nowhere
        _save(root / "images" / f"c{i}.nii.gz", image[..., None] if len(shape) == 2 else image, spacing)
        _save(root / "labels" / f"c{i}.nii.gz", label[..., None] if len(shape) == 2 else label, spacing)
        images.append(image)
        labels.append(label)
    return root, images, labels


def test_fingerprint_of_a_2d_site_is_exact(tmp_path):
    root, images, labels = _site(tmp_path / "site-x", [(10, 12), (14, 12), (20, 8), (12, 16)])
    fp = site_fingerprint(root, test_fraction=0.25)
    assert (fp.site_id, fp.num_cases, fp.num_train, fp.spatial_dims) == ("site-x", 4, 3, 2)
    assert fp.shape_median == (13, 12) and fp.shape_min == (10, 8) and fp.shape_max == (20, 16)
    assert fp.spacing == pytest.approx(SPACING)
    every_label = np.concatenate([x.ravel() for x in labels])
    assert fp.classes == (0, 1, 3)
    assert fp.class_fractions == pytest.approx([np.mean(every_label == c) for c in (0, 1, 3)])
    every_voxel = np.concatenate([x.ravel() for x in images]).astype(np.float64)
    assert fp.intensity.mean == pytest.approx(every_voxel.mean())
    assert fp.intensity.std == pytest.approx(every_voxel.std())
    assert fp.intensity.p50 == pytest.approx(np.median(every_voxel))  # < 10k voxels per case: every voxel
    assert fp.intensity.p00_5 == pytest.approx(np.percentile(every_voxel, 0.5))
    foreground = every_voxel[every_label > 0]
    assert fp.intensity_foreground.mean == pytest.approx(foreground.mean())
    assert fp.intensity_foreground.p99_5 == pytest.approx(np.percentile(foreground, 99.5))


def test_fingerprint_of_a_3d_site(tmp_path):
    root, _, _ = _site(tmp_path / "site-3d", [(8, 9, 10), (8, 9, 12)], spacing=(1.0, 1.0, 3.0))
    fp = site_fingerprint(root)
    assert fp.spatial_dims == 3 and fp.shape_median == (8, 9, 11) and fp.spacing == pytest.approx((1.0, 1.0, 3.0))


def test_only_aggregates_leave_the_site(tmp_path):
    """The record's size does not grow with the number of cases: nothing per case is in it."""
    small = site_fingerprint(_site(tmp_path / "a", [(10, 10)] * 2)[0]).to_record()
    large = site_fingerprint(_site(tmp_path / "b", [(10, 10)] * 7, seed=1)[0]).to_record()
    assert small.keys() == large.keys()
    for key, value in small.items():
        assert np.shape(value) == np.shape(large[key]), key
    assert all(np.size(v) <= 5 for v in large.values())


def test_record_round_trip_and_malformed_records(tmp_path):
    fp = site_fingerprint(_site(tmp_path / "site-a", [(10, 12), (12, 12)])[0])
    record = ConfigRecord(fp.to_record())
    assert SiteFingerprint.from_record(record) == fp
    with pytest.raises(ProtocolError, match=FP_CLASSES):
        SiteFingerprint.from_record({**fp.to_record(), FP_CLASSES: [0.5, 1.0]})
    bad = fp.to_record()
    del bad[FP_CLASSES]
    with pytest.raises(ProtocolError, match="missing"):
        SiteFingerprint.from_record(bad)


def test_a_3d_case_in_a_2d_site_is_left_out_as_the_loader_rejects_it(tmp_path):
    root, images, _ = _site(tmp_path / "mixed", [(10, 10), (12, 12)])
    _site(tmp_path / "other", [(6, 6, 6)])
    for kind in ("images", "labels"):
        (tmp_path / "other" / kind / "c0.nii.gz").rename(root / kind / "c9.nii.gz")
    fp = site_fingerprint(root)
    assert (fp.num_cases, fp.spatial_dims, fp.shape_max) == (2, 2, (12, 12))
    every_voxel = np.concatenate([x.ravel() for x in images]).astype(np.float64)
    assert fp.intensity.mean == pytest.approx(every_voxel.mean())
    from client.data import load_site

    assert [r.case for r in load_site(root).rejected] == ["c9"]


def test_a_site_without_a_usable_case_is_refused_naming_it(tmp_path):
    root, _, _ = _site(tmp_path / "broken", [(10, 10)])
    (root / "labels" / "c0.nii.gz").unlink()
    with pytest.raises(DataError, match="broken.*no valid case"):
        site_fingerprint(root)


def test_the_query_handler_answers_with_the_fingerprint_only_when_asked(tmp_path):
    from flwr.app import Context, Message, RecordDict
    from flwr.common import MessageType

    from client.app import app as client_app
    from shared_models.protocol import CONFIG, FINGERPRINT_RECORD, RoundConfig
    from tests.helpers import set_task_identity

    set_task_identity()
    root, _, _ = _site(tmp_path / "site-q", [(10, 12), (12, 12), (12, 14)])
    context = Context(run_id=1, node_id=1, node_config={"site-id": "site-q", "data-dir": str(root), "state-dir": str(tmp_path / "s")},
                      state=RecordDict(), run_config={})
    replies = {}
    for asked in (False, True):
        cfg = RoundConfig(run_name="r", model_spec={"name": "unet"}, fingerprint="", with_fingerprint=asked)
        message = Message(content=RecordDict({CONFIG: ConfigRecord(cfg.to_record())}), dst_node_id=1, message_type=MessageType.QUERY)
        message.metadata.__dict__["_message_id"] = f"q{asked}"
        replies[asked] = client_app(message, context).content
    assert FINGERPRINT_RECORD not in replies[False]
    answered = SiteFingerprint.from_record(replies[True][FINGERPRINT_RECORD])
    assert answered == site_fingerprint(root, site_id="site-q")
