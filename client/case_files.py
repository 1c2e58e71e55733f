"""Which files make up a site's cases, and which cases cannot be used (from names and headers only).

A case is one label (``labels/<case>.nii.gz``) and its image: one file per case
(``images/<case>.nii.gz``, 2D/3D or a 4D file whose last axis is the channel) or,
nnU-Net style, one file per modality (``images/<case>_0000.nii.gz``,
``<case>_0001.nii.gz``, ...). Everything that makes one case unusable (no label,
a missing modality, image and label on different grids, a symlink out of the
site folder, an unreadable header) rejects that case with a one-line reason
naming its files; the rest of the site is still used. Only a site without
``images/``/``labels/`` or without any file is a :class:`DataError` here.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

SUFFIXES = (".nii.gz", ".nii")
AFFINE_TOLERANCE = 1e-3  # mm; image and label affines further apart than this are different grids
CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DataError(ValueError):
    """A site's files are missing, unreadable or inconsistent (the message names the path)."""


@dataclass(frozen=True)
class Rejected:
    """A case the site cannot use, and why (one line naming its files).

    ``misfit``: its files are sound but its channels or dims differ from the
    site's other cases (a missing modality), so a converter can skip it alone.
    """

    case: str
    reason: str
    misfit: bool = False


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: its image (one path, or one per modality in channel order) and label."""

    name: str
    images: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class SiteFiles:
    """The usable cases of a site, the rejected ones, and the channels/dims the usable ones share."""

    cases: tuple[CaseFiles, ...]
    rejected: tuple[Rejected, ...]
    in_channels: int
    spatial_dims: int


# ---------------------------------------------------------------- names


def case_name(path: Path) -> str | None:
    for suffix in SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _entries(folder: Path) -> list[tuple[str, Path]]:
    """(stem, path) of every NIfTI entry, symlinks included even when broken (hidden files ignored)."""
    out = []
    for path in sorted(folder.iterdir()):
        name = case_name(path)
        if name is None or path.name.startswith(".") or not (path.is_file() or path.is_symlink()):
            continue
        out.append((name, path))
    return out


def scan_folder(folder: Path) -> dict[str, Path]:
    """Case name -> file of one images/ or labels/ folder (hidden files ignored); a duplicate is an error."""
    found: dict[str, Path] = {}
    for name, path in _entries(folder):
        if name in found:
            raise DataError(f"{path}: duplicate case {name!r} (also {found[name]})")
        found[name] = path
    return found


def pair_cases(
    site_dir: Path, images: str = "images", labels: str = "labels", case_of: Callable[[str, Path], str] | None = None
) -> list[tuple[str, Path, Path]]:
    """(name, image, label) of every case of a site, sorted by name; any pairing problem is an error.

    ``case_of(image_stem, path)`` maps an image file's name to its case when it is
    not the label's name (nnU-Net's ``case_0000`` channel suffix); it may raise
    :class:`DataError` for a file the site cannot use.
    """
    images_dir, labels_dir = _check_folders(site_dir, images, labels)
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


def _check_folders(site_dir: Path, images: str, labels: str) -> tuple[Path, Path]:
    images_dir, labels_dir = site_dir / images, site_dir / labels
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: missing folder (a site needs {images}/ and {labels}/)")
    return images_dir, labels_dir


def group_images(entries: list[tuple[str, Path]], label_names: set[str]) -> dict[str, dict[int | None, list[Path]]]:
    """Case -> {channel index (None: one file per case) -> files}; a stem that is a label name is a whole case."""
    groups: dict[str, dict[int | None, list[Path]]] = {}
    for stem, path in entries:
        m = CHANNEL.match(stem)
        case, channel = (m.group("case"), int(m.group("channel"))) if m and stem not in label_names else (stem, None)
        groups.setdefault(case, {}).setdefault(channel, []).append(path)
    return groups


def pair_site(site_dir: Path, images: str = "images", labels: str = "labels") -> tuple[list[CaseFiles], list[Rejected]]:
    """Every case of a site by name, and the cases whose files do not pair up (reasons name the files)."""
    images_dir, labels_dir = _check_folders(site_dir, images, labels)
    image_entries, label_entries = _entries(images_dir), _entries(labels_dir)
    if not image_entries:
        raise DataError(f"{site_dir}: empty site (no {'/'.join(SUFFIXES)} files in {images_dir})")
    by_label: dict[str, list[Path]] = {}
    for stem, path in label_entries:
        by_label.setdefault(stem, []).append(path)
    groups = group_images(image_entries, set(by_label))
    cases, rejected = [], []
    for case in sorted(set(groups) | set(by_label)):
        files, reason = _case_files(case, groups.get(case, {}), by_label.get(case, []), images_dir, labels_dir)
        if reason is None:
            cases.append(files)
        else:
            rejected.append(Rejected(case, reason))
    return cases, rejected


def _case_files(case: str, channels: dict[int | None, list[Path]], labels: list[Path], images_dir: Path, labels_dir: Path):
    """(CaseFiles, None) or (None, reason) for one case name."""
    if not labels:
        first = next(iter(channels.values()))[0]
        return None, f"{first}: no label for this image (expected {labels_dir / (case + '.nii.gz')})"
    if not channels:
        return None, f"{labels[0]}: label without an image in {images_dir}"
    duplicated = [paths for paths in [labels, *channels.values()] if len(paths) > 1]
    if duplicated:
        return None, f"{duplicated[0][0]}: duplicate file for case {case!r} (also {duplicated[0][1]})"
    if None in channels and len(channels) > 1:
        return None, f"{channels[None][0]}: case {case!r} has both a whole-case image and per-modality _NNNN files"
    order = sorted(channels, key=lambda c: -1 if c is None else c)
    return CaseFiles(case, tuple(channels[c][0] for c in order), labels[0]), None


# ---------------------------------------------------------------- symlinks and headers


def outside_site(path: Path, site_root: Path) -> str | None:
    """Why a symlinked case file cannot be used (points outside the site folder, or nowhere), else None."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if not target.exists():
        return f"{path}: broken symlink (-> {target})"
    if site_root not in target.parents:
        return f"{path}: symlink pointing outside the site folder {site_root} (-> {target})"
    return None


@dataclass(frozen=True)
class Header:
    """What a file's header says about its grid: spatial shape, channels, affine."""

    shape: tuple[int, ...]
    channels: int
    affine: np.ndarray


def read_header(path: Path, kind: str) -> Header:
    """The grid of one file from its header; (H, W, 1) counts as 2D, a 4th axis as channels."""
    try:
        img = nib.load(str(path))
        shape, affine = tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=float)
    except Exception as exc:  # nibabel raises anything on a damaged header
        raise DataError(f"{path}: unreadable {kind} ({type(exc).__name__}: {exc})") from exc
    if len(shape) not in (2, 3, 4):
        raise DataError(f"{path}: {kind} must be 2D or 3D (+ channels), got shape {shape}")
    spatial, channels = (shape[:3], shape[3]) if len(shape) == 4 else (shape, 1)
    if len(spatial) == 3 and spatial[2] == 1:
        spatial = spatial[:2]
    return Header(spatial, channels, affine)


def case_geometry(files: CaseFiles, site_root: Path | None = None) -> tuple[int, int]:
    """(channels, spatial dims) of a case whose files agree on one grid; DataError naming both files otherwise."""
    for path in (*files.images, files.label) if site_root is not None else ():
        reason = outside_site(path, site_root)
        if reason:
            raise DataError(reason)
    label = read_header(files.label, "label")
    if label.channels != 1:
        raise DataError(f"{files.label}: label has {label.channels} channels, expected 1")
    channels = 0
    for path in files.images:
        image = read_header(path, "image")
        if len(files.images) > 1 and image.channels != 1:
            raise DataError(f"{path}: a per-modality file must hold one channel, found {image.channels}")
        if image.shape != label.shape:
            raise DataError(f"{path}: image shape {image.shape} differs from label {files.label} shape {label.shape}")
        gap = float(np.abs(image.affine - label.affine).max())
        if gap > AFFINE_TOLERANCE:
            raise DataError(f"{path}: image affine differs from the affine of its label {files.label} (max difference {gap:.3g})")
        channels += image.channels
    return channels, len(label.shape)


def _most_common(values: list[int]) -> int:
    """The value most cases have; a tie goes to the larger (a case lacking a modality is the odd one)."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def discover_site(site_dir: str | Path, images: str = "images", labels: str = "labels", confine: bool = True) -> SiteFiles:
    """The cases of a site that can be read, the rejected ones, and their shared channel count and dims.

    ``images``/``labels``: the sub-folder names (MSD/nnU-Net: ``imagesTr``/``labelsTr``).
    ``confine``: reject symlinks leading out of the site folder (what training reads);
    a converter that only reads its sources may follow them.
    """
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise DataError(f"{site_dir}: site folder does not exist")
    pairs, rejected = pair_site(site_dir, images, labels)
    root = site_dir.resolve() if confine else None
    geometry: dict[str, tuple[int, int]] = {}
    for files in pairs:
        try:
            geometry[files.name] = case_geometry(files, root)
        except DataError as exc:
            rejected.append(Rejected(files.name, str(exc)))
    usable = [f for f in pairs if f.name in geometry]
    if not usable:
        return SiteFiles((), tuple(sorted(rejected, key=lambda r: r.case)), 0, 0)
    dims = _most_common([geometry[f.name][1] for f in usable])
    channels = _most_common([geometry[f.name][0] for f in usable if geometry[f.name][1] == dims])
    kept = []
    for files in usable:
        reason = _odd_case(files, geometry[files.name], channels, dims)
        if reason:
            rejected.append(Rejected(files.name, reason, misfit=True))
        else:
            kept.append(files)
    return SiteFiles(tuple(kept), tuple(sorted(rejected, key=lambda r: r.case)), channels, dims)


def _odd_case(files: CaseFiles, geometry: tuple[int, int], channels: int, dims: int) -> str | None:
    """Why a case does not fit the site's channels/dims (the other cases'), else None."""
    have, ndim = geometry
    if ndim != dims:
        return f"{files.images[0]}: case {files.name!r} is {ndim}D, the site's other cases are {dims}D"
    if have == channels:
        return None
    indexed = [CHANNEL.match(case_name(p) or "") for p in files.images]
    if have < channels and all(indexed):
        present = {int(m.group("channel")) for m in indexed}
        missing = ", ".join(f"_{c:04d}" for c in range(channels) if c not in present) or "a channel"
        return f"{files.images[0]}: case {files.name!r} lacks modality {missing} that the site's other cases have ({channels} channels)"
    return f"{files.images[0]}: case {files.name!r} has {have} image channels, the site's other cases have {channels}"
