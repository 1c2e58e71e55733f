"""A site's data fingerprint: the summary a planner needs, computed where the data is.

nnU-Net plans a network from a dataset fingerprint (shapes, spacing, classes,
intensities). In a federation the planner never sees the data, so each site
summarises its own folder and only the aggregates leave this module: counts,
per-axis medians/extremes, class voxel fractions and intensity moments and
percentiles. No image, label or per-case value is part of the result.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from shared_models.protocol import IntensityStats, SiteFingerprint

from .data import DataError, pair_cases, read_case, split_cases

SAMPLE_PER_CASE = 10_000  # voxels per case kept for the percentiles (nnU-Net samples 10k per case too)
PERCENTILES = (0.5, 50.0, 99.5)


class _Intensities:
    """Exact mean/std over every voxel; percentiles over an evenly strided sample of each case."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.squares = 0.0
        self.samples: list[np.ndarray] = []

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        values = values.astype(np.float64, copy=False)
        self.n += values.size
        self.total += float(values.sum())
        self.squares += float(np.square(values).sum())
        self.samples.append(values[:: max(1, values.size // SAMPLE_PER_CASE)])

    def stats(self) -> IntensityStats:
        if self.n == 0:
            return IntensityStats(*([float("nan")] * 5))
        mean = self.total / self.n
        std = float(np.sqrt(max(self.squares / self.n - mean * mean, 0.0)))
        low, mid, high = np.percentile(np.concatenate(self.samples), PERCENTILES)
        return IntensityStats(mean, std, float(low), float(mid), float(high))


def _spacing(path: Path, spatial_dims: int) -> tuple[float, ...]:
    """Voxel size per spatial axis from the NIfTI header (mm)."""
    zooms = nib.load(path).header.get_zooms()
    return tuple(float(z) for z in zooms[:spatial_dims])


def _median(rows: list[tuple], kind: type) -> tuple:
    return tuple(kind(v) for v in np.median(np.asarray(rows, dtype=np.float64), axis=0))


def site_fingerprint(site_dir: str | Path, *, test_fraction: float = 0.25, site_id: str | None = None) -> SiteFingerprint:
    """The fingerprint of one site folder (``SITE/images``, ``SITE/labels``), read with :mod:`client.data`.

    ``num_train`` is the size of the training split :func:`client.data.load_site`
    makes with ``test_fraction`` (the same for every split seed).
    """
    site_dir = Path(site_dir)
    pairs = pair_cases(site_dir)
    shapes, spacings, counts = [], [], np.zeros(0, dtype=np.int64)
    overall, foreground = _Intensities(), _Intensities()
    for name, image_path, label_path in pairs:
        case = read_case(name, image_path, label_path, "none")
        shape = tuple(int(s) for s in case.image.shape[1:])
        if shapes and len(shape) != len(shapes[0]):
            raise DataError(f"{image_path}: {len(shape)}D image in a site of {len(shapes[0])}D images")
        shapes.append(shape)
        spacings.append(_spacing(image_path, len(shape)))
        hist = np.bincount(case.label.ravel())
        counts = np.pad(counts, (0, max(0, hist.size - counts.size))) + np.pad(hist, (0, max(0, counts.size - hist.size)))
        overall.add(case.image.ravel())
        foreground.add(case.image[case.label > 0])
    present = np.flatnonzero(counts)
    train, _ = split_cases([name for name, _, _ in pairs], test_fraction, 0)
    return SiteFingerprint(
        site_id=site_id or site_dir.resolve().name,
        num_cases=len(pairs),
        num_train=len(train),
        spatial_dims=len(shapes[0]),
        shape_median=_median(shapes, lambda v: int(round(v))),
        shape_min=tuple(int(v) for v in np.min(shapes, axis=0)),
        shape_max=tuple(int(v) for v in np.max(shapes, axis=0)),
        spacing=_median(spacings, float),
        classes=tuple(int(c) for c in present),
        class_fractions=tuple(float(counts[c] / counts.sum()) for c in present),
        intensity=overall.stats(),
        intensity_foreground=foreground.stats(),
    )
