"""Layouts hospitals already have, turned into the foundation layout ``client.data`` reads.

Two layouts, one folder per site under ``SRC``:

* ``folder``: the foundation layout itself, ``SRC/<site>/images|labels/<case>.nii.gz``
  (or one image file per modality, ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...).
  Without a target spacing it is validated in place (every file read by
  ``client.data``, labels checked, at least one foreground class) and ``SRC`` is
  returned: nothing is copied. With ``spacing`` it is resampled like ``msd``.
* ``msd``: Medical Segmentation Decathlon / nnU-Net style,
  ``SRC/<site>/imagesTr/<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... (or one
  ``<case>.nii.gz``, 4D for several modalities: channels in the last axis) and
  ``SRC/<site>/labelsTr/<case>.nii.gz``. Every case is reoriented to RAS
  (MONAI ``Orientation``) and resampled to one target spacing (MONAI ``Spacing``:
  bilinear for every modality, nearest for labels), given or the per-axis median
  over all cases of all sites, and written with its new affine to
  ``OUT/<site>/images/<case>.nii.gz`` (one channel) or ``<case>_0000.nii.gz``,
  ``<case>_0001.nii.gz``, ... (one file per modality), ``OUT/<site>/labels/<case>.nii.gz``,
  plus ``OUT/dataset.json`` (``in_channels``, ``spacing``, the cases, the rejected
  ones). Intensity normalization per image stays with ``client.data`` (z-score per
  channel when a site is loaded).

Cases are found by the rules ``client.case_files`` reads a site with. A case that
lacks a modality the site's other cases have is rejected with one line naming it
and the modality, and the others are prepared; any other problem with a file is a
:class:`client.data.DataError` naming it, and all sites must share dims and channels.
The output is a cache: ``dataset.json`` records the parameters and the size and
mtime of every source file, and a second call with unchanged inputs rewrites nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.utils import convert_to_numpy

from .case_files import CaseFiles, SiteFiles, discover_site, read_header
from .case_read import load_checked
from .data import DataError, infer_num_classes, list_sites, load_all, resolve_in_channels

FORMAT_VERSION = 2  # 2: ``in_channels``, one image file per modality, ``rejected``
LAYOUTS = ("auto", "folder", "msd")
log = logging.getLogger("fedsite.prepare")


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


def source_site(site_dir: str | Path, layout: str) -> SiteFiles:
    """The cases of one source site, by the rules ``client.data`` reads a site with.

    A file problem (no label, a duplicate, image and label on different grids, an
    unreadable header) is a DataError naming the file: a conversion should not
    silently drop an export error. A sound case that lacks a modality the site's
    other cases have (or is 2D among 3D) is listed as rejected and the rest is
    prepared.
    """
    folders = ("imagesTr", "labelsTr") if layout == "msd" else ("images", "labels")
    found = discover_site(site_dir, *folders, confine=False)  # only read here; the output holds real files
    fatal = [r for r in found.rejected if not r.misfit]
    if fatal:
        raise DataError(fatal[0].reason)
    return found


def output_names(case: str, channels: int) -> list[str]:
    """Image file names of a prepared case: ``<case>.nii.gz``, or ``<case>_0000.nii.gz``, ... per modality."""
    return [f"{case}.nii.gz"] if channels == 1 else [f"{case}_{c:04d}.nii.gz" for c in range(channels)]


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


def shared_geometry(sites: dict[str, SiteFiles]) -> tuple[int, int, tuple[float, ...]]:
    """(spatial dims, image channels, per-axis median RAS spacing) that every site shares; DataError naming a site that differs."""
    dims = {s: f.spatial_dims for s, f in sites.items()}
    first = next(iter(dims))
    odd = next((s for s, d in dims.items() if d != dims[first]), None)
    if odd is not None:
        raise DataError(f"sites mix {dims[first]}D ({first}) and {dims[odd]}D ({odd}) images")
    channels = resolve_in_channels({}, {s: f.in_channels for s, f in sites.items()})
    spacings = [_ras_spacing(read_header(c.images[0], "image").affine, dims[first]) for f in sites.values() for c in f.cases]
    return dims[first], channels, tuple(float(v) for v in np.median(np.stack(spacings), axis=0))


def resample_case(files: CaseFiles, dims: int, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32 (C, *S), label int64 (*S), affine 4x4) in RAS at ``spacing``, every modality alike; values checked."""
    image, label, meta = load_checked(files, dims, orientation="RAS", spacing=spacing)
    return image, label[0], convert_to_numpy(meta.affine, dtype=np.float64)


# ---------------------------------------------------------------- cache


def _fingerprint(sites: dict[str, SiteFiles]) -> list[list]:
    out = []
    for site, found in sites.items():
        for files in found.cases:
            for path in (*files.images, files.label):
                st = path.stat()
                out.append([site, files.name, path.name, st.st_size, st.st_mtime_ns])
    return out


def _written(out: Path, params: dict) -> list[Path]:
    """Every case file a ``dataset.json`` says was written (format 1 had no ``in_channels``: one channel)."""
    channels = int(params.get("in_channels", 1))
    return [
        path
        for site, cases in params["cases"].items()
        for case in cases
        for path in (*(out / site / "images" / n for n in output_names(case, channels)), out / site / "labels" / f"{case}.nii.gz")
    ]


def _is_current(out: Path, params: dict) -> bool:
    try:
        old = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(old, dict) or {k: v for k, v in old.items() if k != "num_classes"} != params:  # num_classes: an output
        return False
    return all(path.is_file() for path in _written(out, params))


def _clear_old(out: Path) -> None:
    """Remove the case files a previous call wrote (only those its dataset.json lists)."""
    try:
        old = json.loads((out / "dataset.json").read_text())
        paths = _written(out, old) if old.get("format") == "fedsite-prepared" else []
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return
    for path in paths:
        path.unlink(missing_ok=True)


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
    detected = detect_layout(src)
    if layout != "auto" and layout != detected:
        raise DataError(f"{src}: --layout {layout} but the site folders are in the {detected} layout")
    layout = detected
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) not in (2, 3) or min(spacing) <= 0:
            raise ValueError(f"spacing must be 2 or 3 positive values, got {spacing}")
    all_sites = _selected_sites(src, layout, sites)
    if layout == "folder" and spacing is None:
        _validate_folder(src, all_sites)
        return src.resolve()
    _check_out(src, out, all_sites)
    found = {s: source_site(src / s, layout) for s in all_sites}
    dims, channels, median = shared_geometry(found)
    if spacing is not None and len(spacing) < dims:
        raise DataError(f"{src}: images are {dims}D but spacing {spacing} has {len(spacing)} values")
    target = tuple(spacing[:dims]) if spacing is not None else median
    params = {
        "format": "fedsite-prepared",
        "version": FORMAT_VERSION,
        "layout": layout,
        "src": str(src.resolve()),
        "spatial_dims": dims,
        "in_channels": channels,
        "spacing": [float(v) for v in target],
        "spacing_from": "given" if spacing is not None else "median",
        "orientation": "RAS",
        "sites": all_sites,
        "cases": {s: [c.name for c in f.cases] for s, f in found.items()},
        "rejected": {s: [{"case": r.case, "reason": r.reason} for r in f.rejected] for s, f in found.items() if f.rejected},
        "source_files": _fingerprint(found),
    }
    for site, f in found.items():
        for r in f.rejected:
            log.warning("site %s: rejected case %s: %s", site, r.case, r.reason)
    if not _is_current(out, params):
        write_prepared(src, out, found, target, params)
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


def write_prepared(src: Path, out: Path, sites: dict[str, SiteFiles], target: tuple[float, ...], params: dict) -> None:
    """Resample every case to RAS at ``target`` spacing; ``dataset.json`` last, once the set is complete."""
    _clear_old(out)
    (out / "dataset.json").unlink(missing_ok=True)  # no marker until the new set is complete
    top = 0
    for site, found in sites.items():
        for kind in ("images", "labels"):
            (out / site / kind).mkdir(parents=True, exist_ok=True)
        for files in found.cases:
            image, label, affine = resample_case(files, found.spatial_dims, target)
            top = max(top, int(label.max()))
            label_dtype = np.uint8 if label.max() < 256 else np.int32
            for channel, name in zip(image, output_names(files.name, len(image)), strict=True):
                _save(channel, affine, np.float32, out / site / "images" / name)
            _save(label, affine, label_dtype, out / site / "labels" / f"{files.name}.nii.gz")
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
        for site, rejected in info.get("rejected", {}).items():
            for r in rejected:
                print(f"fedsite prepare-data: site {site}: rejected case {r['case']}: {r['reason']}", file=sys.stderr)
        print(f"fedsite prepare-data: {info['layout']} -> {root}: {counts}; spacing {tuple(info['spacing'])} mm ({info['spacing_from']}), RAS, "
              f"{info.get('in_channels', 1)} channel(s), {info['num_classes']} classes")
    else:
        print(f"fedsite prepare-data: {root} is already in the foundation layout (validated, used in place)")
    print(f"use it with: fedsite simulate --data {root}")
    return 0
