"""simulations.site_profiles: more sites than reference scanners, the first four unchanged."""

from __future__ import annotations

import argparse
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from simulations import synth_cli
from simulations.domain_shift import DEFAULT_PROFILES, make_anatomy, render
from simulations.site_profiles import site_name, site_profiles

def _synth(out, sites: int, cases: int = 2) -> None:
    args = argparse.Namespace(out=out, sites=sites, cases_per_site=cases, spatial_dims=2, size=[16, 16], num_classes=4, seed=0)
    assert synth_cli.run(args) == 0


def _digest(site_dir, cases: int = 2) -> str:
    h = hashlib.sha256()
    for kind in ("images", "labels"):
        for i in range(cases):
            h.update(np.asarray(nib.load(site_dir / kind / f"case-{i:03d}.nii.gz").dataobj).tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def nine_sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("nine")
    _synth(out, 9)
    return out


def test_site_names_are_bijective_base26():
    assert [site_name(i) for i in (0, 3, 25, 26, 27, 51, 52)] == [
        "site-a", "site-d", "site-z", "site-aa", "site-ab", "site-az", "site-ba"]
    names = [p.name for p in site_profiles(64)]
    assert len(set(names)) == 64 and names[:4] == [p.name for p in DEFAULT_PROFILES]


def test_nine_sites_written_with_distinct_intensities(nine_sites):
    sites = sorted(p.name for p in nine_sites.iterdir() if p.is_dir())
    assert sites == [site_name(i) for i in range(9)]
    assert json.loads((nine_sites / "dataset.json").read_text())["sites"] == sites
    stats = []
    for site in sites:
        images = sorted((nine_sites / site / "images").glob("case-*.nii.gz"))
        assert len(images) == 2 and len(list((nine_sites / site / "labels").glob("case-*.nii.gz"))) == 2
        values = np.concatenate([np.asarray(nib.load(f).dataobj).ravel() for f in images])
        stats.append((float(values.mean()), float(values.std())))
    for i in range(9):
        for j in range(i):
            assert not np.allclose(stats[i], stats[j], rtol=0.02), (sites[i], sites[j], stats[i], stats[j])


def test_first_four_sites_unchanged(nine_sites, tmp_path):
    """More sites add scanners; the four reference ones keep their parameters and their files, byte for byte.

    (Compared with a four-site run on this machine, not with stored digests: the rendering's float
    arithmetic may round differently on another CPU.)"""
    assert site_profiles(4) == DEFAULT_PROFILES and site_profiles(9)[:4] == DEFAULT_PROFILES
    _synth(tmp_path, 4)
    for site in (p.name for p in DEFAULT_PROFILES):
        assert _digest(nine_sites / site) == _digest(tmp_path / site)
        for kind in ("images", "labels"):
            for i in range(2):
                name = f"{kind}/case-{i:03d}.nii.gz"
                assert (nine_sites / site / name).read_bytes() == (tmp_path / site / name).read_bytes()


def test_every_scanner_has_its_own_intensities():
    # The same anatomy, scanned with the same random draws by each of 9 scanners.
    label = make_anatomy(np.random.default_rng(0), 2, (32, 32))
    stats = [render(label, p, np.random.default_rng(1)) for p in site_profiles(9)]
    stats = [(float(img.mean()), float(img.std())) for img in stats]
    for i in range(9):
        for j in range(i):
            assert not np.allclose(stats[i], stats[j], rtol=0.05), (i, j, stats[i], stats[j])


def test_extra_profiles_are_seeded_by_name():
    first, again = site_profiles(9), site_profiles(12)
    assert first == again[:9]
    extra = first[4:]
    assert len(set(extra)) == 5 and all(p not in DEFAULT_PROFILES for p in extra)
    # Each extra site keeps its family's kind: site-h (family d) is low-resolution and blurred.
    assert first[7].resolution < 1 and first[7].blur_sigma > 0 and first[5].tissue_intensity[1] > first[5].tissue_intensity[2]
