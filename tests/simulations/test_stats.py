"""Intervals and paired comparisons of a result table."""

import math
import zlib

import numpy as np
import pytest

from simulations.report import dice_table, summarise
from simulations.stats import bootstrap_ci, compare, comparisons, excludes_zero

SITES = ["a", "b", "c"]


def _runs(method, offset, seeds=(0, 1, 2), noise=0.02):
    rng = np.random.default_rng(zlib.crc32(method.encode()))  # hash() is salted per process
    return [{"method": method, "seed": s, "per_site": {site: {"dice": 0.5 + offset + noise * rng.standard_normal()} for site in SITES}}
            for s in seeds]


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_cells():
    rng = np.random.default_rng(0)
    few, many = list(rng.normal(0.6, 0.1, 9)), list(rng.normal(0.6, 0.1, 400))
    lo, hi = bootstrap_ci(few)
    assert lo < np.mean(few) < hi
    lo2, hi2 = bootstrap_ci(many)
    assert hi2 - lo2 < hi - lo and lo2 < 0.6 < hi2
    assert bootstrap_ci([0.5]) is None and bootstrap_ci([0.5, 0.5]) is None


def test_a_clear_gain_excludes_zero_and_noise_does_not():
    runs = _runs("local", 0.0) + _runs("fedbn", 0.1) + _runs("fedavg", 0.0005)
    by_pair = {(c["a"], c["b"]): c for c in comparisons(runs, SITES)}
    assert set(by_pair) == {("fedbn", "local"), ("fedavg", "local"), ("fedbn", "fedavg")}
    gain = by_pair[("fedbn", "local")]
    assert gain["diff"] == pytest.approx(0.1, abs=0.03) and excludes_zero(gain["ci95"]) and gain["p"] < 0.01
    assert gain["n"] == 9 and gain["seeds"] == 3
    assert not excludes_zero(by_pair[("fedavg", "local")]["ci95"])


def test_pairs_are_matched_by_seed_and_site():
    a = [{"method": "x", "seed": 0, "per_site": {"a": {"dice": 0.9}, "b": {"dice": 0.1}}}]
    b = [{"method": "y", "seed": 0, "per_site": {"a": {"dice": 0.8}, "b": {"dice": 0.0}}}]
    row = compare(a + b, "x", "y", ["a", "b"])
    assert row["diff"] == pytest.approx(0.1) and row["ci95"] is None  # one seed: no interval
    assert math.isfinite(row["p"]) or row["n"] < 2


def test_one_seed_shows_no_spread():
    runs = [{**r, "mean_dice": 0.5, "per_site": r["per_site"]} for r in _runs("local", 0.0, seeds=(0,))]
    results = {"sites": SITES, "summary": summarise(runs, SITES)}
    assert results["summary"]["local"]["ci95"] is None
    assert "| n/a |" in dice_table(results) and "± 0.000" not in dice_table(results)
