"""One case from disk through MONAI dictionary transforms: load, channel-first, (orientation, spacing), checks, intensity.

The geometric part (``geometry_transforms``) is shared by reading a site, by
``fedsite prepare-data`` (RAS + one spacing) and by ``fedsite predict`` (the same
preprocessing, then inverted back to the input's grid), so the three cannot
drift apart. Intensity normalization runs on numpy arrays after the checks, as
the training data always had it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.data import NibabelReader
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    LoadImage,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    Spacingd,
    SqueezeDim,
)
from monai.utils import convert_to_numpy

from .case_files import CaseFiles, DataError, read_header

Intensity = str  # "zscore" | "none"
AXES = (("L", "R"), ("P", "A"), ("I", "S"))
_READER = NibabelReader()
_LOAD = LoadImage(image_only=True, dtype=np.float32, reader=_READER)
_CHANNEL_FIRST = EnsureChannelFirst()


@dataclass(frozen=True)
class Case:
    """One case, channel-first: image float32 (C, *S), label int64 (1, *S), voxel size in mm per spatial axis."""

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...] = ()  # () when unknown: distances are then in voxels


class DropTrailingSingletond(MapTransform):
    """(C, H, W, 1) -> (C, H, W): a 2D image stored as a one-slice volume (a no-op on (C, H, W))."""

    def __init__(self, keys: KeysCollection, spatial_dims: int):
        super().__init__(keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].ndim == self.spatial_dims + 2 and d[key].shape[-1] == 1:
                d[key] = d[key][..., 0]  # indexing keeps the 4x4 affine that NIfTI writers need
        return d


def geometry_transforms(
    keys: Sequence[str], spatial_dims: int, orientation: str | None = None, spacing: Sequence[float] | None = None,
    modes: Sequence[str] = ("bilinear", "nearest"), padding: Sequence[str] = ("border", "zeros"),
) -> Compose:
    """Load ``keys`` channel-first (a list of files stacks as channels); optionally reorient and resample.

    ``modes``/``padding`` pair with ``keys`` (images bilinear with border padding,
    labels nearest with zeros, as ``fedsite prepare-data`` writes them).
    """
    keys = list(keys)
    steps = [
        LoadImaged(keys, reader=_READER, image_only=True, dtype=np.float32, ensure_channel_first=True),
        DropTrailingSingletond(keys, spatial_dims),
    ]
    if orientation:
        steps.append(Orientationd(keys, axcodes=orientation[:spatial_dims], labels=AXES))
    if spacing is not None:
        pixdim = tuple(float(s) for s in spacing[:spatial_dims])
        steps.append(Spacingd(keys, pixdim=pixdim, mode=list(modes[: len(keys)]), padding_mode=list(padding[: len(keys)]),
                              dtype=np.float32))
    return Compose(steps)


def voxel_spacing(image, spatial_dims: int) -> tuple[float, ...]:
    """Voxel size (mm) per array axis, from the MetaTensor's affine."""
    return tuple(float(v) for v in convert_to_numpy(affine_to_spacing(image.affine, r=spatial_dims)))


def _unreadable(files: CaseFiles, exc: Exception) -> DataError:
    """The first file of the case that fails to read alone, named with its reader's error."""
    for kind, path in [*(("image", p) for p in files.images), ("label", files.label)]:
        try:
            _LOAD(path)
        except Exception as inner:  # the reader raises anything from EOFError to zlib.error
            return DataError(f"{path}: unreadable {kind} ({type(inner).__name__}: {inner})")
    return DataError(f"{files.images[0]}: case {files.name!r} unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]})")


def check_label(values: np.ndarray, path: Path) -> np.ndarray:
    """Label as int64; non-finite, fractional or negative values are errors."""
    if not np.isfinite(values).all():
        raise DataError(f"{path}: label contains NaN/Inf")
    if not np.array_equal(values, np.round(values)):
        bad = values[values != np.round(values)].flat[0]
        raise DataError(f"{path}: label values must be integers, found {bad:g}")
    if values.min() < 0:
        raise DataError(f"{path}: negative label value {values.min():g}")
    return values.astype(np.int64)


def load_checked(files: CaseFiles, spatial_dims: int, orientation: str | None = None, spacing: Sequence[float] | None = None):
    """(image float32 (C, *S), label int64 (1, *S), image MetaTensor) after the geometry transforms; values checked."""
    source = list(files.images) if len(files.images) > 1 else files.images[0]
    try:
        data = geometry_transforms(("image", "label"), spatial_dims, orientation, spacing)({"image": source, "label": files.label})
    except Exception as exc:
        raise _unreadable(files, exc) from exc
    image = convert_to_numpy(data["image"], dtype=np.float32)
    bad = [c for c in range(image.shape[0]) if not np.isfinite(image[c]).all()]
    if bad:
        path = files.images[bad[0]] if len(files.images) > 1 else files.images[0]
        raise DataError(f"{path}: image contains {int((~np.isfinite(image)).sum())} NaN/Inf voxels")
    label = check_label(convert_to_numpy(data["label"], dtype=np.float32), files.label)
    if image.shape[1:] != label.shape[1:] or label.shape[0] != 1:
        raise DataError(f"{files.images[0]}: image shape {image.shape[1:]} differs from label {files.label} shape {label.shape[1:]}")
    return image, label, data["image"]


def read_case_files(
    files: CaseFiles, spatial_dims: int, intensity: Intensity = "zscore",
    orientation: str | None = None, spacing: Sequence[float] | None = None,
) -> Case:
    """One case as a :class:`Case` (in its files' own grid unless ``orientation``/``spacing`` say otherwise);
    DataError naming the file for anything unusable."""
    image, label, meta = load_checked(files, spatial_dims, orientation, spacing)
    if intensity == "zscore":
        image = convert_to_numpy(NormalizeIntensityd("image", channel_wise=True)({"image": image})["image"], dtype=np.float32)
    return Case(files.name, image, label, voxel_spacing(meta, spatial_dims))


# ---------------------------------------------------------------- single files (new-site adaptation)


def read_image(path: Path, kind: str) -> np.ndarray:
    """Channel-first float32 array (1, *S) of one single-channel file; 2D stored as (H, W, 1) becomes (1, H, W)."""
    try:
        data = _CHANNEL_FIRST(_LOAD(path))
    except Exception as exc:  # the reader raises anything from EOFError to zlib.error
        raise DataError(f"{path}: unreadable {kind} ({type(exc).__name__}: {exc})") from exc
    if data.shape[0] != 1:
        raise DataError(f"{path}: {kind} has {data.shape[0]} channels, expected 1 (shape {tuple(data.shape)})")
    if data.ndim == 4 and data.shape[-1] == 1:
        data = SqueezeDim(dim=-1)(data)
    if data.ndim not in (3, 4):
        raise DataError(f"{path}: {kind} must be 2D or 3D, got spatial shape {tuple(data.shape[1:])}")
    return convert_to_numpy(data, dtype=np.float32)


def read_case(name: str, image_path: Path, label_path: Path, intensity: Intensity) -> Case:
    """One single-file image/label pair (same checks as a site's cases)."""
    dims = len(read_header(label_path, "label").shape)
    return read_case_files(CaseFiles(name, (Path(image_path),), Path(label_path)), dims, intensity)
