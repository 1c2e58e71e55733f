"""Intervals and paired comparisons of a result table."""

import math
import zlib

import numpy as np
import pytest

from simulations.report import dice_table, summarise
from simulations.stats import bootstrap_ci, case_tables, compare, comparisons, excludes_zero, method_ci, site_score

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


def _case_runs(n_cases, spread, seeds=(0, 1, 2), sites=("a", "b")):
    """Runs whose sites carry per-case Dice tables (2 classes) with a given case-to-case spread."""
    rng = np.random.default_rng(1)
    runs = []
    for seed in seeds:
        per_site = {}
        for site in sites:
            table = np.clip(0.7 + spread * rng.standard_normal((n_cases, 2)), 0, 1)
            table[0, 1] = np.nan  # a case without class 2
            rows = [[None if np.isnan(v) else float(v) for v in row] for row in table]
            per_site[site] = {"dice": site_score(table), "dice_per_case": rows}
        runs.append({"method": "fedbn", "seed": seed, "per_site": per_site})
    return runs


def test_the_interval_resamples_test_cases_and_matches_the_site_score_definition():
    few, many = _case_runs(6, 0.15), _case_runs(60, 0.15)
    tables = case_tables(few, "fedbn", ["a", "b"])
    assert site_score(tables[0][0]) == pytest.approx(few[0]["per_site"]["a"]["dice"])
    ci_few, ci_many = method_ci(few, "fedbn", ["a", "b"]), method_ci(many, "fedbn", ["a", "b"])
    mean_few = np.mean([s["dice"] for r in few for s in r["per_site"].values()])
    assert ci_few[0] < mean_few < ci_few[1]
    # the same case-to-case spread over ten times the cases: a much narrower interval
    assert (ci_many[1] - ci_many[0]) < 0.6 * (ci_few[1] - ci_few[0])
    # seeds that agree exactly still leave the test-case uncertainty
    twins = [dict(few[0], seed=0), dict(few[0], seed=1)]
    low, high = method_ci(twins, "fedbn", ["a", "b"])
    assert high - low > 0.02
    assert method_ci(few, "fedbn", ["a", "b"]) == ci_few  # seeded


def test_runs_without_per_case_scores_fall_back_to_seed_site_cells():
    runs = _case_runs(6, 0.15)
    for run in runs:
        for entry in run["per_site"].values():
            del entry["dice_per_case"]
    assert case_tables(runs, "fedbn", ["a", "b"]) is None
    values = [s["dice"] for r in runs for s in r["per_site"].values()]
    assert method_ci(runs, "fedbn", ["a", "b"]) == bootstrap_ci(values)
