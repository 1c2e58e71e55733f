"""A site's segmentation dataset from disk: NIfTI image/label pairs read with MONAI.

Layout of one site: ``SITE/images/<case>.nii.gz`` (or one file per modality,
``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...) and ``SITE/labels/<case>.nii.gz``;
a multi-site dataset is ``DATA/<site>/images|labels``. A case that a hospital's
export got wrong (a missing label or modality, image and label on different grids,
a NaN voxel, a label 2.5, a truncated file, a symlink out of the site folder) is
rejected with a one-line reason naming its files, logged, and listed on the
:class:`SiteData`; the site goes on with its other cases, and only a site without
any usable case fails, as a :class:`DataError` naming it. Loaded sites are cached
per process because a simulation asks for the same site every round; the cache
key includes every file's size and mtime so an edited file is reloaded.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from monai.transforms import ResizeWithPadOrCrop
from monai.utils import convert_to_numpy

from .case_files import SUFFIXES, DataError, Rejected, discover_site, pair_cases, scan_folder
from .case_read import Case, check_label, read_case, read_case_files, read_image

__all__ = [
    "Case", "DataError", "Rejected", "SiteData", "SUFFIXES", "cached_for_site", "clear_cache", "infer_num_classes", "list_sites", "load_cases",
    "load_site", "pair_cases", "read_case", "read_image", "resolve_in_channels", "scan_folder", "site_in_channels", "split_cases",
]

Intensity = Literal["zscore", "none"]
CACHE_SIZE = 32  # (site, options) entries kept per process; a simulation needs one per site
log = logging.getLogger("fedsite.data")


@dataclass(frozen=True)
class SiteData:
    """A site's usable cases split into train/test, all padded/cropped to ``spatial_shape``; the rejected ones."""

    site: str
    root: Path
    spatial_dims: int
    num_classes: int
    train: tuple[Case, ...]
    test: tuple[Case, ...]
    spatial_shape: tuple[int, ...]
    in_channels: int = 1
    rejected: tuple[Rejected, ...] = ()

    @property
    def n_rejected(self) -> int:
        return len(self.rejected)


@dataclass(frozen=True)
class LoadedCases:
    """Every usable case of a site (one shape) and the rejected ones, before any split."""

    cases: tuple[Case, ...]
    rejected: tuple[Rejected, ...]
    in_channels: int
    spatial_dims: int
    label_paths: tuple[tuple[str, Path], ...] = ()  # (case, label file), to name the file of a later rejection


def list_sites(data_dir: str | Path) -> list[str]:
    """Sorted names of the sub-folders of ``data_dir`` that have an ``images/`` folder."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder does not exist")
    sites = sorted(p.name for p in data_dir.iterdir() if (p / "images").is_dir() and not p.name.startswith("."))
    if not sites:
        raise DataError(f"{data_dir}: no site folders (expected {data_dir}/<site>/images and labels)")
    return sites


def _fit(case: Case, shape: tuple[int, ...]) -> Case:
    """Center pad/crop to ``shape``; padding is 0 (the mean after z-scoring; background for labels)."""
    if case.image.shape[1:] == shape:
        return case
    resize = ResizeWithPadOrCrop(shape)
    image = convert_to_numpy(resize(case.image), dtype=np.float32)
    label = convert_to_numpy(resize(case.label), dtype=np.int64)
    return Case(case.name, image, label, case.spacing)


def _freeze(case: Case) -> Case:
    """Cached arrays are shared by every caller: make them contiguous and read-only."""
    image, label = np.ascontiguousarray(case.image), np.ascontiguousarray(case.label)
    image.setflags(write=False)
    label.setflags(write=False)
    return Case(case.name, image, label, case.spacing)


# ---------------------------------------------------------------- cache

_LOCK = threading.RLock()
_CACHE: OrderedDict[tuple, tuple[tuple, object]] = OrderedDict()


def _fingerprint(site_dir: Path) -> tuple:
    """(name, size, mtime_ns) of every entry of images/ and labels/ (a symlink: its own and its target's).

    Changes when a file is edited, added, removed or re-pointed; reads no file.
    """
    items = []
    for sub in ("images", "labels"):
        folder = site_dir / sub
        if not folder.is_dir():
            raise DataError(f"{folder}: missing folder (a site needs images/ and labels/)")
        for path in sorted(folder.iterdir()):
            st = path.lstat()
            target = path.stat() if path.is_symlink() and path.exists() else st
            items.append((str(path), st.st_size, st.st_mtime_ns, target.st_size, target.st_mtime_ns))
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


def cached_for_site(site_dir: Path, key: tuple, build):
    """``build()`` memoised per process while the files of ``site_dir`` are unchanged (``key[1]``: the folder)."""
    return _cached(key, _fingerprint(site_dir), build)


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


def _read_all(site_dir: Path, intensity: Intensity) -> LoadedCases:
    """Every usable case in its own shape, and the rejected cases with their reasons."""
    found = discover_site(site_dir)
    cases, rejected = [], list(found.rejected)
    for files in found.cases:
        try:
            cases.append(read_case_files(files, found.spatial_dims, intensity))
        except DataError as exc:
            rejected.append(Rejected(files.name, str(exc)))
    labels = tuple((f.name, f.label) for f in found.cases)
    return LoadedCases(tuple(cases), tuple(sorted(rejected, key=lambda r: r.case)), found.in_channels, found.spatial_dims, labels)


def _build_cases(site_dir: Path, intensity: Intensity, shape: tuple[int, ...] | None) -> LoadedCases:
    loaded = _read_all(site_dir, intensity)
    for r in loaded.rejected:
        log.warning("site %s: rejected case %s: %s", site_dir.name, r.case, r.reason)
    if not loaded.cases:
        raise _no_valid_case(site_dir, loaded.rejected)
    ndim = loaded.spatial_dims
    if shape is None:
        shape = tuple(int(max(c.image.shape[1 + d] for c in loaded.cases)) for d in range(ndim))
    elif len(shape) != ndim:
        raise DataError(f"{site_dir}: images are {ndim}D but spatial_shape={shape} has {len(shape)} sizes")
    cases = tuple(_freeze(_fit(c, shape)) for c in loaded.cases)
    return LoadedCases(cases, loaded.rejected, loaded.in_channels, ndim, loaded.label_paths)


def _no_valid_case(site_dir: Path, rejected) -> DataError:
    first = f"; first: {rejected[0].reason}" if rejected else ""
    return DataError(f"site {site_dir.name} ({site_dir}): no valid case ({len(rejected)} rejected{first})")


def load_all(
    site_dir: str | Path, *, intensity: Intensity = "zscore", spatial_shape: tuple[int, ...] | None = None
) -> LoadedCases:
    """Every usable case of a site (sorted by name, one shape) and the rejected ones. Cached."""
    site_dir = Path(site_dir)
    shape = _check_options(intensity, spatial_shape)
    if not site_dir.is_dir():
        raise DataError(f"{site_dir}: site folder does not exist")
    key = ("cases", str(site_dir.resolve()), intensity, shape)
    return _cached(key, _fingerprint(site_dir), lambda: _build_cases(site_dir, intensity, shape))


def load_cases(
    site_dir: str | Path, *, intensity: Intensity = "zscore", spatial_shape: tuple[int, ...] | None = None
) -> tuple[Case, ...]:
    """All usable cases of a site, sorted by name, unsplit (prediction, pooled training). Cached."""
    return load_all(site_dir, intensity=intensity, spatial_shape=spatial_shape).cases


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


def _check_classes(loaded: LoadedCases, num_classes: int | None) -> tuple[int, list[Rejected]]:
    """Given num_classes: cases with a label at or above it are rejected; None: infer max+1 (at least 2)."""
    cases, paths = loaded.cases, dict(loaded.label_paths)
    maxima = [int(c.label.max()) for c in cases]
    if num_classes is None:
        return max(max(maxima) + 1, 2), []
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return num_classes, [
        Rejected(c.name, f"{paths.get(c.name, c.name)}: label value {top} >= num_classes={num_classes}")
        for c, top in zip(cases, maxima) if top >= num_classes
    ]


def load_site(
    site_dir: str | Path,
    *,
    test_fraction: float = 0.25,
    split_seed: int = 0,
    num_classes: int | None = None,
    intensity: Intensity = "zscore",
    spatial_shape: tuple[int, ...] | None = None,
) -> SiteData:
    """A site's usable cases with a deterministic train/test split. Cached (same object while files are unchanged)."""
    site_dir = Path(site_dir)
    shape = _check_options(intensity, spatial_shape)
    if not site_dir.is_dir():
        raise DataError(f"{site_dir}: site folder does not exist")
    root = site_dir.resolve()
    key = ("site", str(root), float(test_fraction), int(split_seed), num_classes, intensity, shape)

    def build() -> SiteData:
        loaded = load_all(site_dir, intensity=intensity, spatial_shape=shape)  # arrays shared with this cache
        classes, over = _check_classes(loaded, num_classes)
        for r in over:
            log.warning("site %s: rejected case %s: %s", root.name, r.case, r.reason)
        dropped = {r.case for r in over}
        cases = [c for c in loaded.cases if c.name not in dropped]
        rejected = tuple(sorted([*loaded.rejected, *over], key=lambda r: r.case))
        if not cases:
            raise _no_valid_case(site_dir, rejected)
        train_names, test_names = split_cases([c.name for c in cases], test_fraction, split_seed)
        by_name = {c.name: c for c in cases}
        return SiteData(
            site=root.name, root=root, spatial_dims=loaded.spatial_dims, num_classes=classes,
            train=tuple(by_name[n] for n in train_names), test=tuple(by_name[n] for n in test_names),
            spatial_shape=tuple(cases[0].image.shape[1:]), in_channels=loaded.in_channels, rejected=rejected,
        )

    return _cached(key, _fingerprint(site_dir), build)


def infer_num_classes(data_dir: str | Path, sites: list[str] | None = None) -> int:
    """Max label value over every usable label file + 1 (labels only: no image is read); a foreground class required."""
    data_dir = Path(data_dir)
    top = -1
    for site in sites if sites is not None else list_sites(data_dir):
        for files in discover_site(data_dir / site).cases:
            try:
                top = max(top, int(check_label(read_image(files.label, "label"), files.label).max()))
            except DataError:
                continue  # the case is rejected when the site is loaded
    if top < 1:
        raise DataError(f"{data_dir}: no foreground label in any label file (max label {top})")
    return top + 1


def site_in_channels(data_dir: str | Path, sites: list[str]) -> dict[str, int]:
    """Image channels of each site's usable cases (from the files' headers; 0 for a site without one)."""
    return {site: discover_site(Path(data_dir) / site).in_channels for site in sites}


def resolve_in_channels(spec: dict, channels: dict[str, int]) -> int:
    """The model's ``in-channels``: the data's, or the spec's when it agrees with every site (else an error naming it)."""
    counts = {s: n for s, n in channels.items() if n > 0}
    if not counts:
        return int(spec.get("in-channels", spec.get("in_channels", 1)))
    first = next(iter(counts))
    for site, n in counts.items():
        if n != counts[first]:
            raise DataError(f"site {site} has {n} image channels but site {first} has {counts[first]}")
    given = spec.get("in-channels", spec.get("in_channels"))
    if given is not None and int(given) != counts[first]:
        odd = next(s for s, n in counts.items() if n != int(given))
        raise DataError(f"model in-channels {int(given)} but site {odd}'s images have {counts[odd]} channels")
    return counts[first]
