"""A site's segmentation dataset from disk: NIfTI image/label pairs read with MONAI.

Layout of one site: ``SITE/images/<case>.nii.gz`` and ``SITE/labels/<case>.nii.gz``;
a multi-site dataset is ``DATA/<site>/images|labels``. Everything that can be wrong
with a hospital's export (a missing label, a NaN voxel, a label 2.5, a truncated
file) fails here with a :class:`DataError` naming the file, not mid-round inside a
Flower worker. Loaded sites are cached per process because a simulation asks for
the same site every round; the cache key includes every file's size and mtime so
an edited file is reloaded.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from monai.data import NibabelReader
from monai.transforms import EnsureChannelFirst, LoadImage, NormalizeIntensity, ResizeWithPadOrCrop, SqueezeDim
from monai.utils import convert_to_numpy

Intensity = Literal["zscore", "none"]
SUFFIXES = (".nii.gz", ".nii")
CACHE_SIZE = 32  # (site, options) entries kept per process; a simulation needs one per site


class DataError(ValueError):
    """A site's files are missing, unreadable or inconsistent (the message names the path)."""


@dataclass(frozen=True)
class Case:
    """One image/label pair, channel-first: image float32 (1, *S), label int64 (1, *S)."""

    name: str
    image: np.ndarray
    label: np.ndarray


@dataclass(frozen=True)
class SiteData:
    """A site's cases split into train/test, all padded/cropped to ``spatial_shape``."""

    site: str
    root: Path
    spatial_dims: int
    num_classes: int
    train: tuple[Case, ...]
    test: tuple[Case, ...]
    spatial_shape: tuple[int, ...]


# ---------------------------------------------------------------- discovery


def _case_name(path: Path) -> str | None:
    for suffix in SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def scan_folder(folder: Path) -> dict[str, Path]:
    """Case name -> file of one images/ or labels/ folder (hidden files ignored)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = _case_name(path)
        if name is None or path.name.startswith(".") or not path.is_file():
            continue
        if name in found:
            raise DataError(f"{path}: duplicate case {name!r} (also {found[name]})")
        found[name] = path
    return found


def pair_cases(
    site_dir: Path, images: str = "images", labels: str = "labels", case_of: Callable[[str, Path], str] | None = None
) -> list[tuple[str, Path, Path]]:
    """(name, image, label) of every case of a site, sorted by name; checks pairing.

    ``case_of(image_stem, path)`` maps an image file's name to its case when it is
    not the label's name (nnU-Net's ``case_0000`` channel suffix); it may raise
    :class:`DataError` for a file the site cannot use.
    """
    images_dir, labels_dir = site_dir / images, site_dir / labels
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: missing folder (a site needs {images}/ and {labels}/)")
    image_files, label_files = scan_folder(images_dir), scan_folder(labels_dir)
    cases: dict[str, Path] = {}
    for stem, path in image_files.items():
        case = stem if case_of is None or stem in label_files else case_of(stem, path)
        if case not in label_files:
            raise DataError(f"{path}: no label for this image (expected {labels_dir / (case + '.nii.gz')})")
        if case in cases:
            raise DataError(f"{path}: duplicate case {case!r} (also {cases[case]})")
        cases[case] = path
    for name, path in label_files.items():
        if name not in cases:
            raise DataError(f"{path}: label without an image in {images_dir}")
    if not cases:
        raise DataError(f"{site_dir}: empty site (no {'/'.join(SUFFIXES)} files in {images_dir})")
    return [(name, cases[name], label_files[name]) for name in sorted(cases)]


def list_sites(data_dir: str | Path) -> list[str]:
    """Sorted names of the sub-folders of ``data_dir`` that have an ``images/`` folder."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder does not exist")
    sites = sorted(p.name for p in data_dir.iterdir() if (p / "images").is_dir() and not p.name.startswith("."))
    if not sites:
        raise DataError(f"{data_dir}: no site folders (expected {data_dir}/<site>/images and labels)")
    return sites


# ---------------------------------------------------------------- reading

_READER = NibabelReader()
_LOAD = LoadImage(image_only=True, dtype=np.float32)
_CHANNEL_FIRST = EnsureChannelFirst()


def read_image(path: Path, kind: str) -> np.ndarray:
    """Channel-first float32 array (1, *S) of one file; 2D stored as (H, W, 1) becomes (1, H, W)."""
    try:
        data = _CHANNEL_FIRST(_LOAD(path, reader=_READER))
    except Exception as exc:  # the reader raises anything from EOFError to zlib.error
        raise DataError(f"{path}: unreadable {kind} ({type(exc).__name__}: {exc})") from exc
    if data.shape[0] != 1:
        raise DataError(f"{path}: {kind} has {data.shape[0]} channels, expected 1 (shape {tuple(data.shape)})")
    if data.ndim == 4 and data.shape[-1] == 1:
        data = SqueezeDim(dim=-1)(data)
    if data.ndim not in (3, 4):
        raise DataError(f"{path}: {kind} must be 2D or 3D, got spatial shape {tuple(data.shape[1:])}")
    return convert_to_numpy(data, dtype=np.float32)


def _read_label(path: Path) -> np.ndarray:
    """Label as int64; non-finite, fractional or negative values are errors."""
    label = read_image(path, "label")
    if not np.isfinite(label).all():
        raise DataError(f"{path}: label contains NaN/Inf")
    if not np.array_equal(label, np.round(label)):
        bad = label[label != np.round(label)].flat[0]
        raise DataError(f"{path}: label values must be integers, found {bad:g}")
    if label.min() < 0:
        raise DataError(f"{path}: negative label value {label.min():g}")
    return label.astype(np.int64)


def read_case(name: str, image_path: Path, label_path: Path, intensity: Intensity) -> Case:
    image = read_image(image_path, "image")
    if not np.isfinite(image).all():
        raise DataError(f"{image_path}: image contains {int((~np.isfinite(image)).sum())} NaN/Inf voxels")
    label = _read_label(label_path)
    if image.shape != label.shape:
        raise DataError(
            f"{image_path}: image shape {image.shape[1:]} differs from label {label_path} shape {label.shape[1:]}"
        )
    if intensity == "zscore":
        image = convert_to_numpy(NormalizeIntensity()(image), dtype=np.float32)
    return Case(name, image, label)


def _fit(case: Case, shape: tuple[int, ...]) -> Case:
    """Center pad/crop to ``shape``; padding is 0 (the mean after z-scoring; background for labels)."""
    if case.image.shape[1:] == shape:
        return case
    resize = ResizeWithPadOrCrop(shape)
    image = convert_to_numpy(resize(case.image), dtype=np.float32)
    label = convert_to_numpy(resize(case.label), dtype=np.int64)
    return Case(case.name, image, label)


def _freeze(case: Case) -> Case:
    """Cached arrays are shared by every caller: make them contiguous and read-only."""
    image, label = np.ascontiguousarray(case.image), np.ascontiguousarray(case.label)
    image.setflags(write=False)
    label.setflags(write=False)
    return Case(case.name, image, label)


# ---------------------------------------------------------------- cache

_LOCK = threading.RLock()
_CACHE: OrderedDict[tuple, tuple[tuple, object]] = OrderedDict()


def _fingerprint(pairs: list[tuple[str, Path, Path]]) -> tuple:
    """(name, size, mtime_ns) of every file: changes when a file is edited, added or removed."""
    items = []
    for _, image, label in pairs:
        for path in (image, label):
            st = path.stat()
            items.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(items)


def _cached(key: tuple, fingerprint: tuple, build):
    """Return the cached value for ``key`` if its files are unchanged, else build and store it."""
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == fingerprint:
            _CACHE.move_to_end(key)
            return hit[1]
        value = build()
        # Drop every stale entry of this folder (any options) so edited data is not held twice.
        for other in [k for k, (fp, _) in _CACHE.items() if k[1] == key[1] and fp != fingerprint]:
            del _CACHE[other]
        _CACHE[key] = (fingerprint, value)
        _CACHE.move_to_end(key)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
        return value


def clear_cache() -> None:
    """Forget every loaded site (tests; freeing memory)."""
    with _LOCK:
        _CACHE.clear()


# ---------------------------------------------------------------- public API


def _check_options(intensity: str, spatial_shape) -> tuple[int, ...] | None:
    if intensity not in ("zscore", "none"):
        raise ValueError(f"intensity must be 'zscore' or 'none', got {intensity!r}")
    if spatial_shape is None:
        return None
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"spatial_shape must be 2 or 3 positive sizes, got {spatial_shape!r}")
    return shape


def _build_cases(site_dir: Path, pairs, intensity: Intensity, shape: tuple[int, ...] | None) -> tuple[Case, ...]:
    cases = [read_case(name, image, label, intensity) for name, image, label in pairs]
    dims = {c.image.ndim - 1 for c in cases}
    if len(dims) > 1:
        first3 = next(c for c in cases if c.image.ndim == 4)
        raise DataError(f"{site_dir}: mixes 2D and 3D images (e.g. {first3.name} is 3D)")
    (ndim,) = dims
    if shape is None:
        shape = tuple(int(max(c.image.shape[1 + d] for c in cases)) for d in range(ndim))
    elif len(shape) != ndim:
        raise DataError(f"{site_dir}: images are {ndim}D but spatial_shape={shape} has {len(shape)} sizes")
    return tuple(_freeze(_fit(c, shape)) for c in cases)


def load_cases(
    site_dir: str | Path, *, intensity: Intensity = "zscore", spatial_shape: tuple[int, ...] | None = None
) -> tuple[Case, ...]:
    """All cases of a site, sorted by name, unsplit (prediction, pooled training). Cached."""
    site_dir = Path(site_dir)
    shape = _check_options(intensity, spatial_shape)
    if not site_dir.is_dir():
        raise DataError(f"{site_dir}: site folder does not exist")
    pairs = pair_cases(site_dir)
    key = ("cases", str(site_dir.resolve()), intensity, shape)
    return _cached(key, _fingerprint(pairs), lambda: _build_cases(site_dir, pairs, intensity, shape))


def split_cases(names, test_fraction: float, split_seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (train, test) split of case names, independent of their order.

    Each name is ranked by a hash of (seed, name), so the split does not depend on the
    file system's listing order and adding a case does not reshuffle the others. With
    two or more cases and ``test_fraction > 0`` both parts get at least one case;
    ``test_fraction == 0`` means no test split.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError("split_cases: duplicate case names")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n = len(names)
    n_test = 0 if test_fraction == 0 or n < 2 else min(max(round(n * test_fraction), 1), n - 1)

    def rank(name: str) -> bytes:
        return hashlib.sha256(f"{split_seed}\0{name}".encode()).digest()

    test = set(sorted(names, key=rank)[:n_test])
    return sorted(n for n in names if n not in test), sorted(test)


def _check_classes(pairs, cases: tuple[Case, ...], num_classes: int | None) -> int:
    """Given num_classes: every label below it; None: infer max+1 (at least 2)."""
    maxima = [int(c.label.max()) for c in cases]
    if num_classes is None:
        return max(max(maxima) + 1, 2)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for (_, _, label_path), top in zip(pairs, maxima):
        if top >= num_classes:
            raise DataError(f"{label_path}: label value {top} >= num_classes={num_classes}")
    return num_classes


def load_site(
    site_dir: str | Path,
    *,
    test_fraction: float = 0.25,
    split_seed: int = 0,
    num_classes: int | None = None,
    intensity: Intensity = "zscore",
    spatial_shape: tuple[int, ...] | None = None,
) -> SiteData:
    """A site's cases with a deterministic train/test split. Cached (same object while files are unchanged)."""
    site_dir = Path(site_dir)
    shape = _check_options(intensity, spatial_shape)
    if not site_dir.is_dir():
        raise DataError(f"{site_dir}: site folder does not exist")
    pairs = pair_cases(site_dir)
    root = site_dir.resolve()
    key = ("site", str(root), float(test_fraction), int(split_seed), num_classes, intensity, shape)

    def build() -> SiteData:
        cases = load_cases(site_dir, intensity=intensity, spatial_shape=shape)  # arrays shared with this cache
        classes = _check_classes(pairs, cases, num_classes)
        train_names, test_names = split_cases([c.name for c in cases], test_fraction, split_seed)
        by_name = {c.name: c for c in cases}
        return SiteData(
            site=root.name,
            root=root,
            spatial_dims=cases[0].image.ndim - 1,
            num_classes=classes,
            train=tuple(by_name[n] for n in train_names),
            test=tuple(by_name[n] for n in test_names),
            spatial_shape=tuple(cases[0].image.shape[1:]),
        )

    return _cached(key, _fingerprint(pairs), build)


def infer_num_classes(data_dir: str | Path, sites: list[str] | None = None) -> int:
    """Max label value over every site's label files + 1; at least one foreground class required."""
    data_dir = Path(data_dir)
    top = -1
    for site in sites if sites is not None else list_sites(data_dir):
        for _, _, label_path in pair_cases(data_dir / site):
            top = max(top, int(_read_label(label_path).max()))
    if top < 1:
        raise DataError(f"{data_dir}: no foreground label in any label file (max label {top})")
    return top + 1
