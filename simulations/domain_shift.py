"""Synthetic multi-site data with a feature (scanner) shift and a shared anatomy distribution.

Every site draws label maps from the same anatomy model, then "scans" them with its
own :class:`ScannerProfile` (tissue contrast, possibly inverted; gamma; bias field;
noise; blur; lower acquisition resolution; intensity units). Per-image z-scoring
removes the units but not the contrast, gamma or blur, so a single set of
normalization statistics fits no site well: the regime where FedBN-style site-local
normalization should beat FedAvg. Written to disk in the layout ``client.data`` reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from monai.transforms import AdjustContrast, GaussianSmooth, RandBiasField, RandGaussianNoise, Resize
from monai.utils import convert_to_numpy

from .dataset_files import draw_seed, write_sites

CLASS_NAMES = ("background", "body", "structure", "lesion")
FORMAT_VERSION = 1
TEXTURE_STD = 0.04  # tissue texture, in units of the [0, 1] tissue-intensity scale


@dataclass(frozen=True)
class ScannerProfile:
    """How one hospital's scanner turns a label map into an image."""

    name: str
    tissue_intensity: tuple[float, ...]  # mean of background + each class, [0, 1] scale
    gamma: float = 1.0  # AdjustContrast non-linearity
    bias_field: float = 0.0  # RandBiasField coefficients drawn from (-b, b); 0 = none
    noise_std: float = 0.0  # RandGaussianNoise std, [0, 1] scale
    blur_sigma: float = 0.0  # GaussianSmooth sigma in voxels; 0 = none
    resolution: float = 1.0  # acquisition resolution relative to the native grid
    scale: float = 1.0  # scanner units: value = scale * intensity + offset
    offset: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tissue_intensity", tuple(float(v) for v in self.tissue_intensity))
        if len(self.tissue_intensity) < 2:
            raise ValueError(f"{self.name}: tissue_intensity needs background + at least one class")
        if self.gamma <= 0 or not 0 < self.resolution <= 1 or self.scale == 0:
            raise ValueError(f"{self.name}: need gamma > 0, 0 < resolution <= 1, scale != 0")
        if min(self.bias_field, self.noise_std, self.blur_sigma) < 0:
            raise ValueError(f"{self.name}: bias_field, noise_std and blur_sigma must be >= 0")


DEFAULT_PROFILES: tuple[ScannerProfile, ...] = (
    # Reference T1-like: dark background, structure brighter than body, dark lesion, MR units.
    ScannerProfile("site-a", (0.05, 0.45, 0.80, 0.20), gamma=1.0, bias_field=0.05, noise_std=0.02, scale=1000.0),
    # Inverted (T2-like) contrast: body brighter than structure, bright lesion.
    ScannerProfile(
        "site-b", (0.05, 0.75, 0.30, 0.95), gamma=1.0, bias_field=0.10, noise_std=0.03, scale=600.0, offset=100.0
    ),
    # Old low-field scanner: compressed contrast, strong noise and bias field, CT-like offset.
    ScannerProfile(
        "site-c", (0.20, 0.45, 0.60, 0.30), gamma=1.0, bias_field=0.30, noise_std=0.06, scale=2000.0, offset=-1000.0
    ),
    # Thick-slice / low-resolution acquisition, blurred, strong gamma, 8-bit-like units.
    ScannerProfile(
        "site-d",
        (0.10, 0.55, 0.90, 0.35),
        gamma=2.2,
        noise_std=0.02,
        blur_sigma=1.0,
        resolution=0.5,
        scale=255.0,
    ),
)


# ---------------------------------------------------------------- anatomy


def _rotation(rng: np.random.Generator, dims: int) -> np.ndarray:
    """A random rotation matrix (2D angle; 3D via QR of a Gaussian matrix)."""
    if dims == 2:
        a = rng.uniform(0, np.pi)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _wobbly_ellipsoid(
    rng: np.random.Generator, grid: np.ndarray, center: np.ndarray, axes: np.ndarray, wobble: float
) -> np.ndarray:
    """Mask of a rotated ellipsoid whose boundary is perturbed by a few low-frequency cosines."""
    column = (-1,) + (1,) * len(axes)
    local = np.tensordot(_rotation(rng, len(axes)).T, grid - center.reshape(column), axes=1)
    unit = local / axes.reshape(column)  # ellipsoid -> unit ball
    level = (unit**2).sum(axis=0)
    for _ in range(3):
        freq = rng.normal(size=len(axes)) * 2.0
        level += wobble * np.cos(np.tensordot(freq, unit, axes=1) + rng.uniform(0, 2 * np.pi))
    return level <= 1.0


def _point_in(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A random voxel coordinate inside ``mask`` (which must be non-empty)."""
    idx = np.flatnonzero(mask)
    return np.array(np.unravel_index(idx[rng.integers(len(idx))], mask.shape), dtype=float)


def make_anatomy(
    rng: np.random.Generator, spatial_dims: int, size: tuple[int, ...], num_classes: int = 4
) -> np.ndarray:
    """Anatomy-like int64 label map: 1 = body, 2 = structure inside it, 3+ = small lesions.

    Sizes are relative to the image so every class appears at any resolution; lesion
    centers are drawn from voxels of the body, so every class is present in every case.
    """
    size = tuple(int(s) for s in size)
    if spatial_dims not in (2, 3) or len(size) != spatial_dims:
        raise ValueError(f"spatial_dims must be 2 or 3 and match size, got {spatial_dims}, {size}")
    if num_classes < 2 or min(size) < 8:
        raise ValueError(f"need num_classes >= 2 and every size >= 8, got {num_classes}, {size}")
    dims = np.array(size, dtype=float)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in size], indexing="ij"))
    label = np.zeros(size, dtype=np.int64)

    body_axes = dims * rng.uniform(0.26, 0.40, spatial_dims)
    body_center = dims / 2 + dims * rng.uniform(-0.06, 0.06, spatial_dims)
    body = _wobbly_ellipsoid(rng, grid, body_center, body_axes, wobble=0.12)
    if not body.any():  # cannot happen with these ranges; keep the guarantee explicit
        body[tuple(int(c) for c in body_center)] = True
    label[body] = 1
    if num_classes >= 3:
        inner_axes = np.maximum(body_axes * rng.uniform(0.35, 0.55, spatial_dims), 2.0)
        inner_center = body_center + (rng.uniform(-0.3, 0.3, spatial_dims) * body_axes)
        inner = _wobbly_ellipsoid(rng, grid, inner_center, inner_axes, wobble=0.2) & body
        if not inner.any():
            inner[tuple(int(c) for c in _point_in(rng, body))] = True
        label[inner] = 2
    for cls in range(3, num_classes):  # small, sometimes elongated (vessel-like) blobs
        center = _point_in(rng, body)
        axes = np.maximum(dims * rng.uniform(0.04, 0.08, spatial_dims), 1.5)
        axes[0] *= rng.uniform(1.0, 2.5)
        label[_wobbly_ellipsoid(rng, grid, center, axes, wobble=0.1) & body] = cls
        label[tuple(int(c) for c in center)] = cls
    return label


# ---------------------------------------------------------------- scanner




def render(label: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """float32 image of ``label``'s shape as ``profile``'s scanner would acquire it."""
    label = np.asarray(label)
    top = int(label.max())
    if top >= len(profile.tissue_intensity):
        raise ValueError(f"{profile.name}: label {top} has no tissue_intensity ({len(profile.tissue_intensity)} given)")
    # Tissue means (anatomy, not scanner: the same law at every site).
    tissue = np.asarray(profile.tissue_intensity, dtype=np.float32)[label]
    return acquire(tissue, profile, rng)


def acquire(tissue: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """A per-voxel tissue-intensity map (*S) as ``profile``'s scanner acquires it.

    Adds a smooth per-case texture, then the scanner chain: bias field, acquisition
    resolution, blur, gamma, noise, intensity units. Random draws come from ``rng``
    in a fixed order, so any caller with the same ``rng`` state gets the same image.
    """
    shape = tissue.shape
    dims = tissue.ndim
    texture = GaussianSmooth(sigma=1.5)(rng.normal(size=(1, *shape)).astype(np.float32))
    texture = convert_to_numpy(texture)
    texture *= TEXTURE_STD / (texture.std() + 1e-8)
    img = (np.asarray(tissue, dtype=np.float32)[None] + texture).astype(np.float32)

    if profile.bias_field > 0:  # receive-coil inhomogeneity, multiplicative around 1
        bias = RandBiasField(coeff_range=(-profile.bias_field, profile.bias_field), prob=1.0)
        bias.set_random_state(seed=draw_seed(rng))
        img = bias(img)
    if profile.resolution < 1:  # acquire coarse, reconstruct on the native grid
        coarse = [max(4, round(s * profile.resolution)) for s in shape]
        img = Resize(coarse, mode="area")(img)
        img = Resize(shape, mode="bilinear" if dims == 2 else "trilinear", align_corners=False)(img)
    if profile.blur_sigma > 0:  # point-spread function
        img = GaussianSmooth(sigma=profile.blur_sigma)(img)
    if profile.gamma != 1.0:
        img = AdjustContrast(gamma=profile.gamma)(img)
    if profile.noise_std > 0:
        noise = RandGaussianNoise(prob=1.0, std=profile.noise_std, sample_std=False)
        noise.set_random_state(seed=draw_seed(rng))
        img = noise(img)
    img = convert_to_numpy(img, dtype=np.float32)[0]
    return (img * np.float32(profile.scale) + np.float32(profile.offset)).astype(np.float32)


# ---------------------------------------------------------------- dataset on disk




def _parameters(profiles, cases_per_site, spatial_dims, size, num_classes, seed) -> dict:
    return {
        "format": "fedsite-domain-shift",
        "version": FORMAT_VERSION,
        "seed": int(seed),
        "num_classes": int(num_classes),
        "class_names": [CLASS_NAMES[c] if c < len(CLASS_NAMES) else f"lesion-{c - 2}" for c in range(num_classes)],
        "spatial_dims": int(spatial_dims),
        "size": [int(s) for s in size],
        "cases_per_site": int(cases_per_site),
        "sites": [p.name for p in profiles],
        "profiles": [{**asdict(p), "tissue_intensity": list(p.tissue_intensity)} for p in profiles],
    }










def generate_dataset(
    out_dir: str | Path,
    *,
    profiles: tuple[ScannerProfile, ...] = DEFAULT_PROFILES,
    cases_per_site: int = 40,
    spatial_dims: int = 2,
    size: tuple[int, ...] | None = None,
    num_classes: int = 4,
    seed: int = 0,
) -> Path:
    """Write ``OUT/<site>/images|labels/case-NNN.nii.gz`` + ``OUT/dataset.json``; return OUT.

    Deterministic in its arguments; a second call with the same arguments finds a
    matching dataset.json (written last, atomically) and rewrites nothing.
    """
    out_dir = Path(out_dir)
    profiles = tuple(profiles)
    size = tuple(size) if size is not None else ((64, 64) if spatial_dims == 2 else (32, 32, 32))
    names = [p.name for p in profiles]
    if not profiles or len(set(names)) != len(names):
        raise ValueError(f"need at least one profile and unique site names, got {names}")
    if cases_per_site < 1:
        raise ValueError(f"cases_per_site must be >= 1, got {cases_per_site}")
    params = _parameters(profiles, cases_per_site, spatial_dims, size, num_classes, seed)
    label_dtype = np.uint8 if num_classes <= 256 else np.int16

    def drawer(profile: ScannerProfile):
        def draw(anatomy_rng, scanner_rng):
            label = make_anatomy(anatomy_rng, spatial_dims, size, num_classes)
            return render(label, profile, scanner_rng), label
        return draw

    return write_sites(out_dir, params, {p.name: drawer(p) for p in profiles}, label_dtype)
