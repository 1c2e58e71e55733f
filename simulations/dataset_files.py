"""The on-disk side of the synthetic generators: seeds, the dataset marker, and the write loop.

Both generators (``domain_shift``, ``anatomy``) write ``OUT/<site>/images|labels/case-NNN.nii.gz``
and then ``OUT/dataset.json`` last and atomically, so a half-written set is never taken as current.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

#: draws one case: (anatomy rng, scanner rng) -> (image, label)
CaseDrawer = Callable[[np.random.Generator, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def draw_seed(rng: np.random.Generator) -> int:
    """An int seed for a MONAI randomizable transform, drawn from ``rng``."""
    return int(rng.integers(2**31 - 1))


def site_seed(seed: int, name: str) -> np.random.SeedSequence:
    """A site's stream depends on its name, not its position, so adding a site changes no other."""
    return np.random.SeedSequence([seed, zlib.crc32(name.encode())])


def case_files(out_dir: Path, params: dict) -> list[Path]:
    return [
        out_dir / site / kind / f"case-{i:03d}.nii.gz"
        for site in params["sites"]
        for kind in ("images", "labels")
        for i in range(params["cases_per_site"])
    ]


def is_current(out_dir: Path, params: dict) -> bool:
    """True when OUT holds a complete set written with exactly ``params``."""
    try:
        old = json.loads((out_dir / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return old == params and all(p.is_file() for p in case_files(out_dir, params))


def clear_old(out_dir: Path, sites: list[str]) -> None:
    """Remove case files a generator wrote before (only ``case-*.nii.gz`` under known sites)."""
    try:
        old = json.loads((out_dir / "dataset.json").read_text()).get("sites", [])
    except (OSError, ValueError, AttributeError):
        old = []
    for site in set(old) | set(sites):
        for kind in ("images", "labels"):
            for path in (out_dir / site / kind).glob("case-*.nii.gz"):
                path.unlink()


def save_nifti(array: np.ndarray, dtype, path: Path) -> None:
    image = nib.Nifti1Image(array.astype(dtype), np.eye(4))
    image.set_data_dtype(dtype)
    nib.save(image, path)


def write_sites(out_dir: Path, params: dict, draw: dict[str, CaseDrawer], label_dtype=np.uint8) -> Path:
    """Write every site's cases with its drawer, then the marker; a no-op when OUT is current."""
    if is_current(out_dir, params):
        return out_dir
    names = list(draw)
    clear_old(out_dir, names)
    (out_dir / "dataset.json").unlink(missing_ok=True)  # no marker until the new set is complete
    for name, drawer in draw.items():
        for kind in ("images", "labels"):
            (out_dir / name / kind).mkdir(parents=True, exist_ok=True)
        for i, case_seed in enumerate(site_seed(params["seed"], name).spawn(params["cases_per_site"])):
            anatomy_seq, scanner_seq = case_seed.spawn(2)
            image, label = drawer(np.random.default_rng(anatomy_seq), np.random.default_rng(scanner_seq))
            save_nifti(image, np.float32, out_dir / name / "images" / f"case-{i:03d}.nii.gz")
            save_nifti(label, label_dtype, out_dir / name / "labels" / f"case-{i:03d}.nii.gz")
    tmp = out_dir / ".dataset.json.tmp"
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, out_dir / "dataset.json")
    return out_dir
