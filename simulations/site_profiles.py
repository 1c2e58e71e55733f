"""Scanner profiles for any number of synthetic sites.

The first sites are the four reference scanners of :data:`DEFAULT_PROFILES`
(``site-a`` .. ``site-d``), unchanged, so a dataset of four sites is the same with
or without this module. Every further site gets a scanner of its own: a copy of one
reference family (cycling a, b, c, d) with its contrast, gamma, bias field, noise,
blur, resolution and intensity units jittered by a generator seeded with the site's
name, so ``site-k`` has the same scanner in every dataset that contains it.
"""

from __future__ import annotations

import string
import zlib
from dataclasses import replace

import numpy as np

from .domain_shift import DEFAULT_PROFILES, ScannerProfile

_PROFILE_STREAM = zlib.crc32(b"fedsite-scanner-profile")
TISSUE_JITTER = 0.05  # +- on each tissue mean, [0, 1] scale
UNITS_JITTER = 0.5  # scale multiplied by exp(U(-j, j))


def site_name(index: int) -> str:
    """``site-a`` .. ``site-z``, then ``site-aa``, ``site-ab``, ... (bijective base 26)."""
    if index < 0:
        raise ValueError(f"site index must be >= 0, got {index}")
    letters = ""
    n = index + 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = string.ascii_lowercase[r] + letters
    return f"site-{letters}"


def jittered_profile(family: ScannerProfile, name: str) -> ScannerProfile:
    """A scanner of ``family``'s kind with its own parameters, drawn from ``name``'s seed."""
    rng = np.random.default_rng(np.random.SeedSequence([_PROFILE_STREAM, zlib.crc32(name.encode())]))
    tissue = np.clip(np.asarray(family.tissue_intensity) + rng.uniform(-TISSUE_JITTER, TISSUE_JITTER, len(family.tissue_intensity)),
                     0.01, 0.99)
    scale = family.scale * float(np.exp(rng.uniform(-UNITS_JITTER, UNITS_JITTER)))
    resolution = family.resolution
    if resolution < 1:
        resolution = float(np.clip(resolution * rng.uniform(0.8, 1.2), 0.3, 0.9))
    return replace(
        family,
        name=name,
        tissue_intensity=tuple(float(v) for v in tissue),
        gamma=family.gamma * float(np.exp(rng.uniform(-0.2, 0.2))),
        bias_field=family.bias_field * float(rng.uniform(0.5, 1.5)),
        noise_std=family.noise_std * float(rng.uniform(0.7, 1.3)),
        blur_sigma=family.blur_sigma * float(rng.uniform(0.7, 1.3)),
        resolution=resolution,
        scale=scale,
        offset=family.offset + scale * float(rng.uniform(-0.1, 0.1)),
    )


def site_profiles(n: int) -> tuple[ScannerProfile, ...]:
    """``n`` distinct scanners: the reference four first, then jittered copies of their families."""
    if n < 1:
        raise ValueError(f"need at least one site, got {n}")
    extra = [jittered_profile(DEFAULT_PROFILES[i % len(DEFAULT_PROFILES)], site_name(i))
             for i in range(len(DEFAULT_PROFILES), n)]
    return tuple(DEFAULT_PROFILES[:n]) + tuple(extra)
