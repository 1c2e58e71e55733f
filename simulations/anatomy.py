"""Real brain anatomy offline: MNI152 tissue maps shipped in nilearn's wheel, scanned per site.

nilearn (an optional extra: ``pip install fedsite[anatomy]``) ships the ICBM152
2009 template (T1, brain-extracted) with its grey- and white-matter probability
maps inside the package, so ``load_mni152_*`` read local files and nothing is
downloaded. From them:

* class probabilities: background ``1 - brain``; GM and WM their maps inside the
  brain mask (nilearn's: template > 0.2); CSF ``1 - GM - WM`` inside the mask
  (sulci, ventricles, the rim around the brain), optional;
* a case is an axial slice (2D; a random level in ``slice_range`` of the brain's
  inferior-superior extent, ``slice_thickness`` 1 mm slices averaged) or the whole
  brain (3D), cropped to the brain's bounding box and resized to ``size``, then
  warped by a random affine + elastic deformation (MONAI Rand2DElastic /
  Rand3DElastic) so no two cases share the exact anatomy;
* label = argmax of the warped probabilities (0 background, 1 GM, 2 WM, 3 CSF);
* image = each site's :class:`~simulations.domain_shift.ScannerProfile` applied to
  the *soft* tissue mix (partial volume at tissue borders), with exactly the
  scanner chain of :func:`simulations.domain_shift.render` (a one-hot mix gives
  ``render``'s image bit for bit). The label order matches the default profiles:
  site-a is T1-like (WM > GM > CSF), site-b T2-like (CSF > GM > WM).

Written in the layout ``client.data`` reads, deterministic in its arguments and
cached: a second call with the same arguments finds a matching ``dataset.json``
and rewrites nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from monai.transforms import Rand2DElastic, Rand3DElastic, Resize
from monai.utils import convert_to_numpy

from .dataset_files import draw_seed, write_sites
from .domain_shift import DEFAULT_PROFILES, ScannerProfile, acquire

CLASS_NAMES = ("background", "gray-matter", "white-matter", "csf")
FORMAT_VERSION = 1
BRAIN_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask default


class AnatomyUnavailable(ImportError):
    """nilearn (the package that ships the MNI152 maps) is not installed."""


@dataclass(frozen=True)
class Deformation:
    """Per-case random affine + elastic warp (ranges as in MONAI's Rand*Elastic)."""

    rotate: float = 0.15  # radians, each axis
    scale: float = 0.10  # relative zoom range (+-)
    translate: float = 0.04  # fraction of the image size (+-)
    magnitude: tuple[float, float] = (1.0, 2.5)  # elastic displacement, voxels (2D) / field units (3D)
    spacing: float = 0.25  # 2D: control-point spacing as a fraction of the size
    sigma: tuple[float, float] = (4.0, 6.0)  # 3D: smoothing of the displacement field, voxels


# ---------------------------------------------------------------- template


def _nilearn_version() -> str | None:
    try:
        return metadata.version("nilearn")
    except metadata.PackageNotFoundError:
        return None


def _require_nilearn():
    try:
        from nilearn import datasets
    except ImportError as exc:
        raise AnatomyUnavailable(
            "the anatomy dataset needs nilearn, which ships the MNI152 template in its wheel: "
            "pip install 'fedsite[anatomy]' (or pip install nilearn)"
        ) from exc
    return datasets


@functools.lru_cache(maxsize=1)
def _mni152_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(brain mask, GM, WM) at 1 mm from the files in nilearn's wheel, cropped to the brain (+2 voxels)."""
    datasets = _require_nilearn()
    template = np.asarray(datasets.load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    if not (template.shape == gm.shape == wm.shape):
        raise RuntimeError(f"nilearn MNI152 maps disagree in shape: T1 {template.shape}, GM {gm.shape}, WM {wm.shape}")
    brain = (template > BRAIN_THRESHOLD).astype(np.float32)
    gm, wm = np.clip(gm, 0, 1) * brain, np.clip(wm, 0, 1) * brain
    over = np.maximum(gm + wm, 1.0)  # the two maps may sum to slightly more than 1
    lo = [max(int(a.min()) - 2, 0) for a in np.nonzero(brain)]
    hi = [int(a.max()) + 3 for a in np.nonzero(brain)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return brain[box], (gm / over)[box], (wm / over)[box]


@functools.lru_cache(maxsize=2)
def tissue_probabilities(include_csf: bool = True) -> np.ndarray:
    """(K, X, Y, Z) float32 class probabilities of MNI152 at 1 mm, cropped to the brain (+2 voxels).

    Channels: background, GM, WM (, CSF); they sum to 1 at every voxel. Axes are
    MNI's RAS: x left->right, y posterior->anterior, z inferior->superior.
    Without CSF its fraction goes to the background.
    """
    brain, gm, wm = _mni152_maps()
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    channels = [1.0 - brain, gm, wm, csf] if include_csf else [1.0 - gm - wm, gm, wm]
    return np.ascontiguousarray(np.stack(channels), dtype=np.float32)


def _crop_to_aspect(probs: np.ndarray, size: tuple[int, ...], margin: float = 0.04) -> np.ndarray:
    """Center the (brain-cropped) field of view in a box with ``size``'s aspect ratio, padding with background."""
    spatial = np.array(probs.shape[1:], dtype=float)
    target = np.array(size, dtype=float)
    scale = (spatial / target).max() * (1.0 + margin)
    want = np.maximum(np.round(target * scale).astype(int), np.array(probs.shape[1:]))
    pads = [(0, 0)] + [((w - s) // 2, w - s - (w - s) // 2) for w, s in zip(want, probs.shape[1:])]
    out = np.pad(probs, pads)
    out[0][_padded_region(pads[1:], out.shape[1:])] = 1.0  # background probability 1 in the padding
    return out


def _padded_region(pads, shape) -> np.ndarray:
    inside = np.zeros(shape, dtype=bool)
    inside[tuple(slice(a, n - b) for (a, b), n in zip(pads, shape))] = True
    return ~inside


def _field_of_view(probs: np.ndarray, spatial_dims: int, size: tuple[int, ...], z: int, thickness: int) -> np.ndarray:
    """(K, *size) probabilities of one axial slab (2D) or the whole brain (3D)."""
    if spatial_dims == 2:
        z0 = min(max(z - thickness // 2, 0), probs.shape[3] - thickness)
        probs = probs[..., z0 : z0 + thickness].mean(axis=-1)
    probs = _crop_to_aspect(probs, size)
    return convert_to_numpy(Resize(size, mode="area")(probs), dtype=np.float32)


def _warp(probs: np.ndarray, spatial_dims: int, size: tuple[int, ...], deformation: Deformation, seed: int) -> np.ndarray:
    """Random affine + elastic warp of the tissue channels; background = 1 - tissue afterwards."""
    d = deformation
    common = dict(
        magnitude_range=d.magnitude,
        prob=1.0,
        rotate_range=(d.rotate,) * (1 if spatial_dims == 2 else 3),
        scale_range=(d.scale,) * spatial_dims,
        translate_range=tuple(d.translate * s for s in size),
        mode="bilinear",
        padding_mode="zeros",
    )
    if spatial_dims == 2:
        warp = Rand2DElastic(spacing=tuple(max(2.0, d.spacing * s) for s in size), **common)
    else:
        warp = Rand3DElastic(sigma_range=d.sigma, **common)
    warp.set_random_state(seed=seed)
    tissue = np.clip(convert_to_numpy(warp(probs[1:]), dtype=np.float32), 0.0, 1.0)
    total = tissue.sum(axis=0, keepdims=True)
    tissue = tissue / np.maximum(total, 1.0)
    return np.concatenate([1.0 - tissue.sum(axis=0, keepdims=True), tissue]).astype(np.float32)


# ---------------------------------------------------------------- scanner


def render_soft(probs: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """float32 image of a soft tissue mix ``probs`` (K, *S) through ``profile``'s scanner.

    The chain (texture, bias field, acquisition resolution, blur, gamma, noise, units)
    and its random draws are those of :func:`simulations.domain_shift.render`; a
    one-hot ``probs`` gives exactly ``render(argmax(probs), profile, rng)``.
    """
    probs = np.asarray(probs, dtype=np.float32)
    k = probs.shape[0]
    if k > len(profile.tissue_intensity):
        raise ValueError(f"{profile.name}: {k} classes but only {len(profile.tissue_intensity)} tissue intensities")
    means = np.asarray(profile.tissue_intensity[:k], dtype=np.float32)
    return acquire(np.tensordot(means, probs, axes=1).astype(np.float32), profile, rng)  # exact for one-hot probs


# ---------------------------------------------------------------- dataset on disk


def _parameters(profiles, cases_per_site, spatial_dims, size, include_csf, slice_range, slice_thickness, deformation, seed) -> dict:
    num_classes = 4 if include_csf else 3
    return {
        "format": "fedsite-anatomy",
        "version": FORMAT_VERSION,
        "source": "MNI152 ICBM 2009 T1 + GM/WM probability maps shipped in nilearn",
        "nilearn": _nilearn_version(),
        "seed": int(seed),
        "num_classes": num_classes,
        "class_names": list(CLASS_NAMES[:num_classes]),
        "spatial_dims": int(spatial_dims),
        "size": [int(s) for s in size],
        "cases_per_site": int(cases_per_site),
        "slice_range": [float(v) for v in slice_range],
        "slice_thickness": int(slice_thickness),
        "deformation": {k: list(v) if isinstance(v, tuple) else v for k, v in deformation.__dict__.items()},
        "sites": [p.name for p in profiles],
        "profiles": [{**p.__dict__, "tissue_intensity": list(p.tissue_intensity)} for p in profiles],
    }


def make_case(
    rng: np.random.Generator,
    spatial_dims: int,
    size: tuple[int, ...],
    *,
    include_csf: bool = True,
    slice_range: tuple[float, float] = (0.3, 0.75),
    slice_thickness: int = 1,
    deformation: Deformation = Deformation(),
) -> np.ndarray:
    """(K, *size) warped class probabilities of one random case (the anatomy, before any scanner)."""
    probs = tissue_probabilities(include_csf)
    depth = probs.shape[3]
    z = int(round(rng.uniform(*slice_range) * (depth - 1)))
    view = _field_of_view(probs, spatial_dims, size, z, slice_thickness)
    return _warp(view, spatial_dims, size, deformation, draw_seed(rng))


def _check_options(profiles: tuple[ScannerProfile, ...], cases_per_site: int, spatial_dims: int, size: tuple[int, ...],
                   include_csf: bool, slice_range: tuple[float, float], slice_thickness: int) -> None:
    """A ValueError naming the first option the generator cannot honour."""
    names = [p.name for p in profiles]
    if spatial_dims not in (2, 3) or len(size) != spatial_dims or min(size) < 8:
        raise ValueError(f"spatial_dims must be 2 or 3 with that many sizes >= 8, got {spatial_dims}, {size}")
    if not profiles or len(set(names)) != len(names):
        raise ValueError(f"need at least one profile and unique site names, got {names}")
    if cases_per_site < 1:
        raise ValueError(f"cases_per_site must be >= 1, got {cases_per_site}")
    if not 0.0 <= slice_range[0] <= slice_range[1] <= 1.0 or slice_thickness < 1:
        raise ValueError(f"need 0 <= slice_range[0] <= slice_range[1] <= 1 and slice_thickness >= 1, got {slice_range}, {slice_thickness}")
    num_classes = 4 if include_csf else 3
    for p in profiles:
        if len(p.tissue_intensity) < num_classes:
            raise ValueError(f"{p.name}: needs {num_classes} tissue intensities ({', '.join(CLASS_NAMES[:num_classes])})")


def generate_anatomy_dataset(
    out_dir: str | Path,
    *,
    profiles: tuple[ScannerProfile, ...] = DEFAULT_PROFILES,
    cases_per_site: int = 24,
    spatial_dims: int = 2,
    size: tuple[int, ...] | None = None,
    seed: int = 0,
    include_csf: bool = True,
    slice_range: tuple[float, float] = (0.3, 0.75),
    slice_thickness: int = 1,
    deformation: Deformation = Deformation(),
) -> Path:
    """Write ``OUT/<site>/images|labels/case-NNN.nii.gz`` + ``OUT/dataset.json`` from MNI152; return OUT.

    ``size`` defaults to (64, 64) in 2D and (32, 32, 32) in 3D. Each site draws its
    own cases (slice level, warp; from ``seed`` and the site's name) and scans them
    with its profile. Profiles need one tissue intensity per class: background, GM,
    WM (, CSF).
    """
    out_dir = Path(out_dir)
    profiles = tuple(profiles)
    size = tuple(int(s) for s in size) if size is not None else ((64, 64) if spatial_dims == 2 else (32, 32, 32))
    _check_options(profiles, cases_per_site, spatial_dims, size, include_csf, slice_range, slice_thickness)
    params = _parameters(profiles, cases_per_site, spatial_dims, size, include_csf, slice_range, slice_thickness, deformation, seed)
    if params["nilearn"] is None:
        _require_nilearn()  # raises the install hint

    def drawer(profile: ScannerProfile):
        def draw(anatomy_rng, scanner_rng):
            probs = make_case(anatomy_rng, spatial_dims, size, include_csf=include_csf, slice_range=slice_range,
                              slice_thickness=slice_thickness, deformation=deformation)
            return render_soft(probs, profile, scanner_rng), probs.argmax(axis=0).astype(np.uint8)
        return draw

    return write_sites(out_dir, params, {p.name: drawer(p) for p in profiles})
