"""The claims of a results table, stated plainly: each comparison and whether it holds.

Every comparison of ``results.json`` (:func:`simulations.stats.comparisons`) pairs
a federated method with a baseline; each is expected to beat its baseline
(difference > 0). A claim *holds* when the 95% interval of the paired difference
excludes 0 on that side, and *does not hold* otherwise (an interval on the other
side, one that spans 0, or none at all with a single seed).
"""

from __future__ import annotations

import math
from typing import Any

# Baseline -> expected sign of (method - baseline): every federated method should beat both.
EXPECTED_SIGN = {"local": 1, "fedavg": 1}
HOLDS, DOES_NOT_HOLD = "holds", "does not hold"


def verdict(comparison: dict[str, Any]) -> str:
    """``holds`` when the interval lies wholly on the expected side of 0."""
    ci = comparison.get("ci95")
    sign = EXPECTED_SIGN.get(comparison["b"])
    if ci is None or sign is None:
        return DOES_NOT_HOLD
    return HOLDS if (ci[0] > 0 if sign > 0 else ci[1] < 0) else DOES_NOT_HOLD


def _claim(comparison: dict[str, Any]) -> str:
    c = comparison
    expected = "better" if EXPECTED_SIGN.get(c["b"], 1) > 0 else "worse"
    ci = f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if c.get("ci95") else "no interval (one seed)"
    p = f"p {c['p']:.3g}" if math.isfinite(c.get("p", float("nan"))) else "p n/a"
    return f"- {c['a']} vs {c['b']} (expected {expected}): diff {c['diff']:+.3f} {ci}, {p}: **{verdict(c)}**"


def claim_lines(comparisons: list[dict[str, Any]]) -> list[str]:
    """One Markdown bullet per comparison, in the order of ``results.json``."""
    return [_claim(c) for c in comparisons]


def claims_block(comparisons: list[dict[str, Any]]) -> list[str]:
    """The claims list under a table, with its one-line legend, or a line saying there is nothing to claim."""
    if not comparisons:
        return ["No claims: the experiment has no `local` or `fedavg` arm to compare against."]
    legend = ("Claims (paired over seeds and sites; diff = mean Dice difference with its 95% bootstrap interval, "
              "p = Wilcoxon signed-rank; a claim holds when the interval excludes 0 in the expected direction):")
    return [legend, "", *claim_lines(comparisons)]
