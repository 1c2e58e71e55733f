"""A site's data fingerprint: the summary a planner needs, computed where the data is.

nnU-Net plans a network from a dataset fingerprint (shapes, spacing, classes,
intensities). In a federation the planner never sees the data, so each site
summarises its own folder and only the aggregates leave this module: counts,
per-axis medians/extremes, class voxel fractions and intensity moments and
percentiles. No image, label or per-case value is part of the result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared_models.protocol import IntensityStats, SiteFingerprint

from .case_files import discover_site
from .case_read import read_case_files
from .data import DataError, split_cases

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


def _median(rows: list[tuple], kind: type) -> tuple:
    return tuple(kind(v) for v in np.median(np.asarray(rows, dtype=np.float64), axis=0))


def site_fingerprint(site_dir: str | Path, *, test_fraction: float = 0.25, site_id: str | None = None) -> SiteFingerprint:
    """The fingerprint of one site folder (``SITE/images``, ``SITE/labels``), read with :mod:`client.data`.

    ``num_train`` is the size of the training split :func:`client.data.load_site`
    makes with ``test_fraction`` (the same for every split seed).
    """
    site_dir = Path(site_dir)
    found = discover_site(site_dir)
    shapes, spacings, names, counts = [], [], [], np.zeros(0, dtype=np.int64)
    overall, foreground = _Intensities(), _Intensities()
    for files in found.cases:
        try:
            case = read_case_files(files, found.spatial_dims, "none")
        except DataError:
            continue  # rejected when the site is loaded; the plan counts only usable cases
        shape = tuple(int(s) for s in case.image.shape[1:])
        names.append(case.name)
        shapes.append(shape)
        spacings.append(case.spacing or (1.0,) * len(shape))
        hist = np.bincount(case.label.ravel())
        counts = np.pad(counts, (0, max(0, hist.size - counts.size))) + np.pad(hist, (0, max(0, counts.size - hist.size)))
        overall.add(case.image.ravel())
        foreground.add(case.image[:, case.label[0] > 0].ravel())
    if not names:
        raise DataError(f"site {site_dir.name} ({site_dir}): no valid case to fingerprint ({len(found.rejected)} rejected)")
    present = np.flatnonzero(counts)
    train, _ = split_cases(names, test_fraction, 0)
    return SiteFingerprint(
        site_id=site_id or site_dir.resolve().name,
        num_cases=len(names),
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
