"""Uncertainty of a result table: bootstrap intervals and paired comparisons between methods.

A method's interval is a two-level percentile bootstrap over seeds and test cases:
resample the seeds (each its own data split, initialisation and shuffling), then
within each (seed, site) resample that site's test cases, and recompute the site
scores exactly as the site does (per class, the mean over cases where it is
present; then the mean over classes). Runs without per-case scores fall back to a
bootstrap over (seed, site) cells. A comparison pairs the (seed, site) cells two
methods share and tests the paired differences with the Wilcoxon signed-rank test.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import stats

BASELINES = ("local", "fedavg")
NOT_FEDERATED = ("local", "pooled")
RESAMPLES = 2000


def cell_scores(runs: list[dict[str, Any]], method: str, sites: list[str]) -> dict[tuple[int, str], float]:
    """(seed, site) -> Dice of ``method``; sites without a finite score are left out."""
    out = {}
    for run in runs:
        if run["method"] != method:
            continue
        for site in sites:
            value = float(run["per_site"].get(site, {}).get("dice", float("nan")))
            if math.isfinite(value):
                out[(int(run["seed"]), site)] = value
    return out


def bootstrap_ci(values: list[float], seed: int = 0) -> list[float] | None:
    """95% percentile-bootstrap interval of the mean; None when under two seeds' worth of cells vary."""
    if len(values) < 2 or len(set(values)) < 2:
        return None
    res = stats.bootstrap((np.asarray(values),), np.mean, confidence_level=0.95, n_resamples=RESAMPLES,
                          method="percentile", rng=np.random.default_rng(seed))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def case_tables(runs: list[dict[str, Any]], method: str, sites: list[str]) -> dict[int, list[np.ndarray]] | None:
    """seed -> each site's (test cases x foreground classes) Dice table; None when a cell lacks one."""
    tables: dict[int, list[np.ndarray]] = {}
    for run in (r for r in runs if r["method"] == method):
        for site in sites:
            rows = run["per_site"].get(site, {}).get("dice_per_case")
            if not rows:
                return None
            table = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
            tables.setdefault(int(run["seed"]), []).append(table)
    return tables or None


def site_score(table: np.ndarray) -> float:
    """A site's Dice from its case table: per class the mean over cases where present, then over classes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every resampled case
        return float(np.nanmean(np.nanmean(table, axis=0)))


def seeds_and_cases_ci(tables: dict[int, list[np.ndarray]], seed: int = 0) -> list[float]:
    """95% two-level percentile bootstrap of the mean site score: seeds, then cases within each site."""
    rng = np.random.default_rng(seed)
    seeds = sorted(tables)
    means = np.empty(RESAMPLES)
    for b in range(RESAMPLES):
        scores = [site_score(t[rng.integers(0, len(t), len(t))])
                  for i in rng.integers(0, len(seeds), len(seeds)) for t in tables[seeds[i]]]
        means[b] = np.nanmean(scores)
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def method_ci(runs: list[dict[str, Any]], method: str, sites: list[str]) -> list[float] | None:
    """The method's interval, only when it ran with at least two seeds (one seed has no seed spread)."""
    scores = cell_scores(runs, method, sites)
    if len({seed for seed, _ in scores}) < 2:
        return None
    tables = case_tables(runs, method, sites)
    return seeds_and_cases_ci(tables) if tables else bootstrap_ci(list(scores.values()))


def compare(runs: list[dict[str, Any]], a: str, b: str, sites: list[str]) -> dict[str, Any] | None:
    """Paired comparison of ``a`` against ``b`` over the (seed, site) cells both have."""
    sa, sb = cell_scores(runs, a, sites), cell_scores(runs, b, sites)
    shared = sorted(set(sa) & set(sb))
    if not shared:
        return None
    diffs = [sa[k] - sb[k] for k in shared]
    p = float("nan")
    if len(diffs) > 1 and any(d != 0 for d in diffs):
        p = float(stats.wilcoxon(diffs, alternative="two-sided").pvalue)
    seeds = len({seed for seed, _ in shared})
    return {"a": a, "b": b, "diff": float(np.mean(diffs)), "ci95": bootstrap_ci(diffs) if seeds > 1 else None,
            "p": p, "n": len(diffs), "seeds": seeds, "test": "Wilcoxon signed-rank, paired over (seed, site)"}


def comparisons(runs: list[dict[str, Any]], sites: list[str]) -> list[dict[str, Any]]:
    """Every federated method against each baseline present (local, fedavg)."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    federated = [m for m in methods if m not in NOT_FEDERATED]
    out = []
    for baseline in (b for b in BASELINES if b in methods):
        for method in federated:
            if method != baseline and (row := compare(runs, method, baseline, sites)) is not None:
                out.append(row)
    return out


def excludes_zero(ci: list[float] | None) -> bool:
    return ci is not None and (ci[0] > 0 or ci[1] < 0)
