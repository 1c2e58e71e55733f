"""What a site may tell a planner about its data: shapes, spacing, classes, intensities, in aggregate.

Computed at the site (:mod:`client.fingerprint`) and sent in a query reply; the
planner (:mod:`server.plan`) reads nothing else of a site's data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .records import SITE_ID, ProtocolError, checked_list, read_fields

FINGERPRINT_RECORD = "fingerprint"
FP_NUM_CASES = "num-cases"
FP_NUM_TRAIN = "num-train"
FP_SPATIAL_DIMS = "spatial-dims"
FP_SHAPE_MEDIAN = "shape-median"
FP_SHAPE_MIN = "shape-min"
FP_SHAPE_MAX = "shape-max"
FP_SPACING = "spacing"
FP_CLASSES = "classes"
FP_CLASS_FRACTIONS = "class-fractions"
FP_INTENSITY = "intensity-all"  # a list in INTENSITY_STATISTICS order
FP_INTENSITY_FOREGROUND = "intensity-foreground"  # the same over label > 0
# The intensity statistics of a fingerprint, in record order.
INTENSITY_STATISTICS = ("mean", "std", "p00_5", "p50", "p99_5")


@dataclass(frozen=True)
class IntensityStats:
    """Summary of a site's image intensities (raw, before z-scoring)."""

    mean: float
    std: float
    p00_5: float
    p50: float
    p99_5: float

    def to_list(self) -> list[float]:
        return [float(getattr(self, name)) for name in INTENSITY_STATISTICS]

    @classmethod
    def from_list(cls, values: list[float]) -> IntensityStats:
        if len(values) != len(INTENSITY_STATISTICS):
            raise ProtocolError(f"intensity statistics: expected {len(INTENSITY_STATISTICS)} values, got {len(values)}")
        return cls(*(float(v) for v in values))


@dataclass(frozen=True)
class SiteFingerprint:
    """What a planner may know of a site's data: counts, shapes, spacing, classes, intensities.

    Shapes and spacing are per spatial axis; ``class_fractions[i]`` is the share of all
    voxels labelled ``classes[i]``. Aggregates only: no image, label or per-case value.
    """

    site_id: str
    num_cases: int
    num_train: int
    spatial_dims: int
    shape_median: tuple[int, ...]
    shape_min: tuple[int, ...]
    shape_max: tuple[int, ...]
    spacing: tuple[float, ...]
    classes: tuple[int, ...]
    class_fractions: tuple[float, ...]
    intensity: IntensityStats
    intensity_foreground: IntensityStats

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {SITE_ID: self.site_id, FP_NUM_CASES: self.num_cases, FP_NUM_TRAIN: self.num_train,
                                  FP_SPATIAL_DIMS: self.spatial_dims, FP_INTENSITY: self.intensity.to_list(),
                                  FP_INTENSITY_FOREGROUND: self.intensity_foreground.to_list()}
        for key, (attr, kind) in _FP_LISTS.items():
            record[key] = [kind(v) for v in getattr(self, attr)]
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SiteFingerprint:
        values = read_fields(cls, _FP_SCALARS, record)
        for key, (attr, kind) in _FP_LISTS.items():
            values[attr] = tuple(checked_list(record, key, kind))
        values["intensity"] = IntensityStats.from_list(checked_list(record, FP_INTENSITY, float))
        values["intensity_foreground"] = IntensityStats.from_list(checked_list(record, FP_INTENSITY_FOREGROUND, float))
        return cls(**values)


_FP_SCALARS = {SITE_ID: "site_id", FP_NUM_CASES: "num_cases", FP_NUM_TRAIN: "num_train", FP_SPATIAL_DIMS: "spatial_dims"}
_FP_LISTS = {
    FP_SHAPE_MEDIAN: ("shape_median", int), FP_SHAPE_MIN: ("shape_min", int), FP_SHAPE_MAX: ("shape_max", int),
    FP_SPACING: ("spacing", float), FP_CLASSES: ("classes", int), FP_CLASS_FRACTIONS: ("class_fractions", float),
}
