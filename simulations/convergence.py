"""Learning curves of a matrix: mean Dice against rounds and against wall time, and where each method plateaus.

A table of final Dice says which method ends higher; a curve says whether the
budget was long enough to ask. Each run's curve is the mean over sites of the
Dice after each evaluated round; a method's curve is the mean over seeds, with a
95% bootstrap interval over seeds, and its time axis is the mean over seeds of
the federation's cumulative round time (training, aggregation, evaluation).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plots import plt  # pyplot on the file-only Agg backend
from .stats import bootstrap_ci

#: a method has plateaued at the first round whose mean Dice is within this of its final one
PLATEAU_TOLERANCE = 0.01


@dataclass(frozen=True)
class CurvePoint:
    round: int
    dice: float  # mean over seeds of the run's mean Dice over sites
    ci: list[float] | None  # 95% bootstrap interval over seeds
    seconds: float  # mean over seeds of the cumulative round time up to this round


def _run_curve(run: dict[str, Any]) -> dict[int, tuple[float, float]]:
    """round -> (mean Dice over the sites scored, cumulative round seconds) of one run."""
    curve, elapsed = {}, 0.0
    for entry in run.get("history", []):
        elapsed += entry.get("train_s", 0.0) + entry.get("aggregate_s", 0.0) + entry.get("evaluate_s", 0.0)
        dice = [float(v) for v in entry.get("dice", {}).values()]
        if dice:
            curve[int(entry["round"])] = (statistics.fmean(dice), elapsed)
    budget = int(run.get("budget_rounds", 0))
    if curve and budget > max(curve):  # a fine-tuning method's final score comes after the rounds' worth of fine-tuning
        curve[budget] = curve.pop(max(curve))
    return curve


def method_curves(results: dict[str, Any]) -> dict[str, list[CurvePoint]]:
    """Every method's curve over the rounds that all of its seeds evaluated."""
    curves: dict[str, list[CurvePoint]] = {}
    for method in dict.fromkeys(r["method"] for r in results["runs"]):
        runs = [_run_curve(r) for r in results["runs"] if r["method"] == method]
        common = sorted(set.intersection(*(set(c) for c in runs))) if runs else []
        curves[method] = [
            CurvePoint(rnd, statistics.fmean(c[rnd][0] for c in runs), bootstrap_ci([c[rnd][0] for c in runs]),
                       statistics.fmean(c[rnd][1] for c in runs))
            for rnd in common
        ]
    return curves


def plateau_round(curve: list[CurvePoint], tolerance: float = PLATEAU_TOLERANCE) -> int | None:
    """The first round from which the curve stays within ``tolerance`` of its final Dice."""
    if not curve:
        return None
    final = curve[-1].dice
    for i, point in enumerate(curve):
        if all(abs(p.dice - final) <= tolerance for p in curve[i:]):
            return point.round
    return curve[-1].round


def _cell(point: CurvePoint | None) -> str:
    if point is None:
        return ""
    ci = f" [{point.ci[0]:.3f}, {point.ci[1]:.3f}]" if point.ci else ""
    return f"{point.dice:.3f}{ci}"


def convergence_table(results: dict[str, Any], columns: int = 6) -> str:
    """Markdown: mean Dice [95% CI over seeds] at evenly spaced rounds, the plateau round and the wall time."""
    curves = method_curves(results)
    last = max((c[-1].round for c in curves.values() if c), default=0)
    if not last:
        return ""
    step = max(1, round(last / columns))
    rounds = sorted({*range(step, last + 1, step), last})
    lines = ["| method | " + " | ".join(f"round {r}" for r in rounds) + " | plateau round | wall s |",
             "|---|" + "---|" * (len(rounds) + 2)]
    for method, curve in curves.items():
        by_round = {p.round: p for p in curve}
        wall = f"{curve[-1].seconds:.0f}" if curve else ""
        lines.append(f"| {method} | " + " | ".join(_cell(by_round.get(r)) for r in rounds)
                     + f" | {plateau_round(curve) or ''} | {wall} |")
    return "\n".join(lines)


def plot_convergence(results: dict[str, Any], path: Path) -> Path:
    """Two panels: mean Dice (with its interval over seeds) against rounds, and against wall time."""
    fig, (by_round, by_time) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for method, curve in method_curves(results).items():
        if not curve:
            continue
        dice = [p.dice for p in curve]
        line, = by_round.plot([p.round for p in curve], dice, label=method, linewidth=1.5)
        banded = [p for p in curve if p.ci]
        if banded:
            by_round.fill_between([p.round for p in banded], [p.ci[0] for p in banded], [p.ci[1] for p in banded],
                                  color=line.get_color(), alpha=0.15, linewidth=0)
        by_time.plot([p.seconds for p in curve], dice, color=line.get_color(), linewidth=1.5)
    by_round.set_xlabel("round")
    by_time.set_xlabel("wall time of the rounds (s)")
    by_round.set_ylabel("mean Dice over sites")
    for ax in (by_round, by_time):
        ax.grid(alpha=0.3)
    by_round.legend(fontsize=7, loc="lower right")
    fig.suptitle("Convergence: mean Dice over sites (mean over seeds, band: 95% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
