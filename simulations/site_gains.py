"""Does a method beat training alone at every site? Per-site paired gains over ``local``.

A federation is worth a hospital's effort only if its own site's model is better
than the one it could train alone; a mean over sites can hide a site that loses.
For each method and site the gain is the mean over seeds of (method - local), paired
by seed (the same data split, initialisation and draws), and the last column counts
the sites where that mean is above 0. The paired interval of the mean over sites is
the comparison table's.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

BASELINE = "local"


def site_gains(results: dict[str, Any], baseline: str = BASELINE) -> dict[str, dict[str, float]]:
    """Per method (not the baseline), per site: mean over the shared seeds of (method - baseline) Dice."""
    by_seed = {(r["method"], r["seed"]): r["per_site"] for r in results["runs"]}
    base_seeds = {seed for method, seed in by_seed if method == baseline}
    gains: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(r["method"] for r in results["runs"]):
        seeds = sorted({seed for m, seed in by_seed if m == method} & base_seeds)
        if method == baseline or not seeds:
            continue
        gains[method] = {}
        for site in results["sites"]:
            pairs = [(by_seed[(method, s)].get(site, {}).get("dice"), by_seed[(baseline, s)].get(site, {}).get("dice")) for s in seeds]
            diffs = [float(a) - float(b) for a, b in pairs if a is not None and b is not None and math.isfinite(float(a) - float(b))]
            gains[method][site] = statistics.fmean(diffs) if diffs else float("nan")
    return gains


def site_gains_table(results: dict[str, Any], baseline: str = BASELINE) -> str:
    """Markdown: one row per method, the per-site gain over ``baseline`` and the count of sites above it."""
    gains = site_gains(results, baseline)
    if not gains:
        return ""
    sites = results["sites"]
    rows = [f"| method | " + " | ".join(sites) + f" | sites above {baseline} |", "|---|" + "---|" * (len(sites) + 1)]
    for method, per_site in gains.items():
        above = sum(1 for v in per_site.values() if v > 0)
        rows.append(f"| {method} | " + " | ".join(f"{per_site[s]:+.3f}" for s in sites) + f" | {above}/{len(sites)} |")
    return "\n".join(rows)
