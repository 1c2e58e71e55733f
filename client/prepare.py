"""Layouts hospitals already have, turned into the foundation layout ``client.data`` reads.

Two layouts, one folder per site under ``SRC``:

* ``folder``: the foundation layout itself, ``SRC/<site>/images|labels/<case>.nii.gz``.
  Without a target spacing it is validated in place (every file read by
  ``client.data``, labels checked, at least one foreground class) and ``SRC`` is
  returned: nothing is copied. With ``spacing`` it is resampled like ``msd``.
* ``msd``: Medical Segmentation Decathlon / nnU-Net style,
  ``SRC/<site>/imagesTr/<case>_0000.nii.gz`` (or ``<case>.nii.gz``) and
  ``SRC/<site>/labelsTr/<case>.nii.gz``. Every case is reoriented to RAS
  (MONAI ``Orientation``) and resampled to one target spacing (MONAI ``Spacing``:
  bilinear for images, nearest for labels), given or the per-axis median over all
  cases of all sites, and written to ``OUT/<site>/images|labels/<case>.nii.gz``
  with its new affine, plus ``OUT/dataset.json``. Intensity normalization per
  image stays with ``client.data`` (z-score when a site is loaded).

The output is a cache: ``dataset.json`` records the parameters and the size and
mtime of every source file, and a second call with unchanged inputs rewrites
nothing. Every error is a :class:`client.data.DataError` naming the file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.utils import convert_to_numpy

from .case_files import CaseFiles, case_geometry
from .case_read import load_checked
from .data import DataError, infer_num_classes, list_sites, load_all, pair_cases

FORMAT_VERSION = 1
LAYOUTS = ("auto", "folder", "msd")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


# ---------------------------------------------------------------- discovery


def _site_dirs(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(src: str | Path) -> str:
    """``"folder"`` or ``"msd"`` from the site sub-folders of ``src`` (mixing both is an error)."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: source folder does not exist")
    kinds = {}
    for site in _site_dirs(src):
        if (site / "imagesTr").is_dir():
            kinds[site.name] = "msd"
        elif (site / "images").is_dir():
            kinds[site.name] = "folder"
    if not kinds:
        hint = " (it looks like a single site: put it in a sub-folder per site)" if (src / "imagesTr").is_dir() or (src / "images").is_dir() else ""
        raise DataError(f"{src}: no site folders with images/ (foundation layout) or imagesTr/ (MSD/nnU-Net){hint}")
    if len(set(kinds.values())) > 1:
        by_kind = {k: sorted(s for s, v in kinds.items() if v == k) for k in set(kinds.values())}
        raise DataError(f"{src}: mixes layouts across sites: folder {by_kind['folder']}, msd {by_kind['msd']}")
    return next(iter(kinds.values()))


def msd_pairs(site_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """(case, image, label) of one MSD/nnU-Net style site (``imagesTr/case_0000``, ``labelsTr/case``), sorted."""
    return pair_cases(Path(site_dir), "imagesTr", "labelsTr", case_of=_nnunet_case)


def _nnunet_case(stem: str, path: Path) -> str:
    """``case_0000`` -> ``case``; other channels are refused (single-channel sites only)."""
    m = _CHANNEL.match(stem)
    if m is None:
        return stem
    if m.group("channel") != "0000":
        raise DataError(f"{path}: extra input channel {m.group('channel')} (only single-channel _0000 images are supported)")
    return m.group("case")


# ---------------------------------------------------------------- geometry


def _ras_spacing(affine: np.ndarray, dims: int) -> np.ndarray:
    """Voxel size along R, A(, S) once the image is reoriented to RAS."""
    affine = np.asarray(affine, dtype=float)
    sub = affine[:dims, :dims] if dims == 2 else affine[:3, :3]
    zooms = np.sqrt((sub**2).sum(axis=0))
    ornt = nib.orientations.io_orientation(np.block([[sub, np.zeros((dims, 1))], [np.zeros((1, dims)), np.ones((1, 1))]]))
    out = np.empty(dims)
    for voxel_axis, (world_axis, _) in enumerate(ornt):
        out[int(world_axis)] = zooms[voxel_axis]
    return out


def _header_geometry(path: Path) -> tuple[int, np.ndarray]:
    """(spatial dims, RAS spacing) from the header only."""
    try:
        img = nib.load(path)
    except Exception as exc:
        raise DataError(f"{path}: unreadable image header ({type(exc).__name__}: {exc})") from exc
    shape = img.shape[:3]
    dims = 2 if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1) else 3
    return dims, _ras_spacing(img.affine, dims)


def median_spacing(pairs: Sequence[tuple[str, Path, Path]]) -> tuple[int, tuple[float, ...]]:
    """Spatial dims shared by every image and the per-axis median of their RAS spacing."""
    dims_seen: dict[int, Path] = {}
    spacings = []
    for _, image, _ in pairs:
        dims, spacing = _header_geometry(image)
        dims_seen.setdefault(dims, image)
        spacings.append(spacing)
    if len(dims_seen) > 1:
        raise DataError(f"mixes 2D and 3D images: {dims_seen[2]} is 2D, {dims_seen[3]} is 3D")
    (dims,) = dims_seen
    return dims, tuple(float(v) for v in np.median(np.stack(spacings), axis=0))


def resample_case(image_path: Path, label_path: Path, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32 (*S), label int64 (*S), affine 4x4) in RAS at ``spacing``; checks the pair."""
    files = CaseFiles(label_path.name, (image_path,), label_path)
    channels, dims = case_geometry(files)  # shapes and affines agree (DataError names both files)
    if channels != 1:
        raise DataError(f"{image_path}: image has {channels} channels, expected 1")
    if len(spacing) < dims:
        raise DataError(f"{image_path}: {dims}D image but target spacing {tuple(spacing)} has {len(spacing)} values")
    image, label, meta = load_checked(files, dims, orientation="RAS", spacing=spacing)
    return image[0], label[0], convert_to_numpy(meta.affine, dtype=np.float64)


# ---------------------------------------------------------------- cache


def _fingerprint(pairs_by_site: dict[str, list[tuple[str, Path, Path]]]) -> list[list]:
    out = []
    for site, pairs in pairs_by_site.items():
        for case, image, label in pairs:
            for path in (image, label):
                st = path.stat()
                out.append([site, case, path.name, st.st_size, st.st_mtime_ns])
    return out


def _is_current(out: Path, params: dict) -> bool:
    try:
        old = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(old, dict) or {k: v for k, v in old.items() if k != "num_classes"} != params:  # num_classes: an output
        return False
    return all(
        (out / site / kind / f"{case}.nii.gz").is_file() for site, cases in params["cases"].items() for case in cases for kind in ("images", "labels")
    )


def _clear_old(out: Path) -> None:
    """Remove the case files a previous call wrote (only those its dataset.json lists)."""
    try:
        old = json.loads((out / "dataset.json").read_text())
        cases = old["cases"] if old.get("format") == "fedsite-prepared" else {}
    except (OSError, ValueError, KeyError, AttributeError):
        return
    for site, names in cases.items():
        for case in names:
            for kind in ("images", "labels"):
                (out / site / kind / f"{case}.nii.gz").unlink(missing_ok=True)


def _save(array: np.ndarray, affine: np.ndarray, dtype, path: Path) -> None:
    image = nib.Nifti1Image(array.astype(dtype), affine)
    image.set_data_dtype(dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


# ---------------------------------------------------------------- public API


def _check_out(src: Path, out: Path, sites: list[str]) -> None:
    """The output must not overwrite the source: not SRC itself, nor inside one of its sites."""
    src_r, out_r = src.resolve(), out.resolve()
    inside_site = src_r in out_r.parents and out_r.relative_to(src_r).parts[0] in sites
    if out_r == src_r or inside_site:
        raise DataError(f"{out}: the output folder must not be the source folder or lie inside one of its sites")


def _validate_folder(src: Path, sites: list[str]) -> None:
    dims: dict[int, str] = {}
    for site in sites:
        loaded = load_all(src / site, intensity="none")  # reads and checks every file
        if loaded.rejected:  # validating in place: a case the site would skip is reported, not skipped
            raise DataError(f"{len(loaded.rejected)} case(s) of site {site} unusable; first: {loaded.rejected[0].reason}")
        dims.setdefault(loaded.spatial_dims, site)
    if len(dims) > 1:
        raise DataError(f"{src}: sites mix 2D ({dims[2]}) and 3D ({dims[3]}) images")
    infer_num_classes(src, sites)


def prepare_dataset(
    src: str | Path,
    out: str | Path,
    layout: str = "auto",
    spacing: Sequence[float] | None = None,
    sites: Sequence[str] | None = None,
) -> Path:
    """The foundation-layout folder for ``src`` (see the module docstring); returns it.

    ``layout``: ``auto`` (detected), ``folder`` or ``msd``. ``spacing``: target voxel
    size (2 values for 2D, 3 for 3D; mm, RAS order); ``None`` = median over all
    cases for ``msd``, no resampling for ``folder``. ``sites``: a subset of the site
    folders (default: all).
    """
    src, out = Path(src), Path(out)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    found = detect_layout(src)
    if layout != "auto" and layout != found:
        raise DataError(f"{src}: --layout {layout} but the site folders are in the {found} layout")
    layout = found
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) not in (2, 3) or min(spacing) <= 0:
            raise ValueError(f"spacing must be 2 or 3 positive values, got {spacing}")
    all_sites = _selected_sites(src, layout, sites)
    if layout == "folder" and spacing is None:
        _validate_folder(src, all_sites)
        return src.resolve()
    _check_out(src, out, all_sites)
    pairs_by_site = {s: (pair_cases(src / s) if layout == "folder" else msd_pairs(src / s)) for s in all_sites}
    all_pairs = [p for pairs in pairs_by_site.values() for p in pairs]
    dims, median = median_spacing(all_pairs)
    target = tuple(spacing[:dims]) if spacing is not None else median
    if spacing is not None and len(spacing) < dims:
        raise DataError(f"{src}: images are {dims}D but spacing {spacing} has {len(spacing)} values")
    params = {
        "format": "fedsite-prepared",
        "version": FORMAT_VERSION,
        "layout": layout,
        "src": str(src.resolve()),
        "spatial_dims": dims,
        "spacing": [float(v) for v in target],
        "spacing_from": "given" if spacing is not None else "median",
        "orientation": "RAS",
        "sites": all_sites,
        "cases": {s: [c for c, _, _ in pairs] for s, pairs in pairs_by_site.items()},
        "source_files": _fingerprint(pairs_by_site),
    }
    if not _is_current(out, params):
        write_prepared(src, out, pairs_by_site, target, params)
    return out


def _selected_sites(src: Path, layout: str, sites: Sequence[str] | None) -> list[str]:
    """The site folders to prepare (all, or the requested subset)."""
    all_sites = list_sites(src) if layout == "folder" else [p.name for p in _site_dirs(src) if (p / "imagesTr").is_dir()]
    if sites is None:
        return all_sites
    missing = [s for s in sites if s not in all_sites]
    if missing:
        raise DataError(f"{src}: no site folder(s) {missing} (found {all_sites})")
    return list(sites)


def write_prepared(src: Path, out: Path, pairs_by_site: dict, target: tuple[float, ...], params: dict) -> None:
    """Resample every case to RAS at ``target`` spacing; ``dataset.json`` last, once the set is complete."""
    _clear_old(out)
    (out / "dataset.json").unlink(missing_ok=True)  # no marker until the new set is complete
    top = 0
    for site, pairs in pairs_by_site.items():
        for kind in ("images", "labels"):
            (out / site / kind).mkdir(parents=True, exist_ok=True)
        for case, image_path, label_path in pairs:
            image, label, affine = resample_case(image_path, label_path, target)
            top = max(top, int(label.max()))
            label_dtype = np.uint8 if label.max() < 256 else np.int32
            _save(image, affine, np.float32, out / site / "images" / f"{case}.nii.gz")
            _save(label, affine, label_dtype, out / site / "labels" / f"{case}.nii.gz")
    if top < 1:
        raise DataError(f"{src}: no foreground label in any label file (max label {top})")
    params["num_classes"] = top + 1
    tmp = out / ".dataset.json.tmp"
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, out / "dataset.json")


def prepared_geometry(site_dir: str | Path) -> tuple[str, tuple[float, ...]] | None:
    """(orientation, spacing) a site's folder was prepared with, from its ``dataset.json``; None if not prepared here."""
    marker = Path(site_dir).resolve().parent / "dataset.json"
    try:
        params = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(params, dict) or params.get("format") != "fedsite-prepared" or Path(site_dir).name not in params.get("sites", []):
        return None
    return str(params["orientation"]), tuple(float(v) for v in params["spacing"])


# ---------------------------------------------------------------- CLI: fedsite prepare-data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True, help="folder with one sub-folder per site")
    parser.add_argument("--out", type=Path, required=True, help="output folder (foundation layout: OUT/<site>/images|labels)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="folder (images/labels) or msd (imagesTr/labelsTr); default: detect")
    parser.add_argument("--spacing", type=float, nargs="+", metavar="MM", help="target voxel size X Y [Z] in mm (default: median over cases; folder layout: keep)")
    parser.add_argument("--sites", help="comma-separated subset of site folders")


def run(args: argparse.Namespace) -> int:
    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else None
    try:
        root = prepare_dataset(args.src, args.out, layout=args.layout, spacing=args.spacing, sites=sites)
    except (DataError, ValueError) as exc:
        print(f"fedsite prepare-data: {exc}", file=sys.stderr)
        return 2
    info = {}
    if (root / "dataset.json").is_file() and root != args.src.resolve():
        info = json.loads((root / "dataset.json").read_text())
    if info:
        counts = ", ".join(f"{s} ({len(c)})" for s, c in info["cases"].items())
        print(f"fedsite prepare-data: {info['layout']} -> {root}: {counts}; spacing {tuple(info['spacing'])} mm ({info['spacing_from']}), RAS, "
              f"{info['num_classes']} classes")
    else:
        print(f"fedsite prepare-data: {root} is already in the foundation layout (validated, used in place)")
    print(f"use it with: fedsite simulate --data {root}")
    return 0
