"""Reports of an experiment: tables (Markdown, CSV, JSON) and plots (PNG).

Every number is the mean over seeds of a per-site score on that site's held-out
split, scored with the site's own model; the spread is the standard deviation
over seeds and a 95% bootstrap interval (see :mod:`.stats`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

from shared_models.durable import atomic_write_text
from shared_models.protocol import RESULTS_FILE

from .site_gains import site_gains_table
from .stats import excludes_zero, method_ci

GAINS_CAPTION = "Gain over local training at each site (mean over seeds of the paired difference in Dice):"


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def _std(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


def _as_float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _site_values(runs: list[dict[str, Any]], site: str, key: str) -> list[float]:
    return [float(r["per_site"].get(site, {}).get(key, float("nan"))) for r in runs]


def summarise(runs: list[dict[str, Any]], sites: list[str]) -> dict[str, Any]:
    """Per method: mean/std over seeds of the mean Dice, per-site Dice and HD95."""
    summary: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        summary[method] = {
            "mean_dice": _mean([r["mean_dice"] for r in mine]),
            "std": _std([r["mean_dice"] for r in mine]),
            "seeds": [r["seed"] for r in mine],
            "per_site": {s: _mean(_site_values(mine, s, "dice")) for s in sites},
            "per_site_std": {s: _std(_site_values(mine, s, "dice")) for s in sites},
            "per_site_hd95": {s: _mean(_site_values(mine, s, "hd95")) for s in sites},
            "ci95": method_ci(runs, method, sites),
        }
    return summary


def _spread(s: dict[str, Any]) -> str:
    """``± std [lo, hi]`` over seeds, or ``n/a`` with a single seed (it has no spread)."""
    if len(s["seeds"]) < 2:
        return "n/a"
    ci = s.get("ci95")
    return f"± {s['std']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def dice_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per method, one column per site, mean, ± std over seeds and the 95% CI last."""
    sites = results["sites"]
    rows = ["| method | " + " | ".join(sites) + " | mean | ± std [95% CI] |", "|---|" + "---|" * len(sites) + "---|---|"]
    for method, s in results["summary"].items():
        cells = " | ".join(f"{s['per_site'][site]:.3f}" for site in sites)
        rows.append(f"| {method} | {cells} | {s['mean_dice']:.3f} | {_spread(s)} |")
    return "\n".join(rows)


def comparison_table(results: dict[str, Any]) -> str:
    """Paired differences against the baselines; ``*`` marks an interval that excludes 0."""
    rows = ["| method | vs | Δ Dice | 95% CI | p (Wilcoxon) | pairs |", "|---|---|---|---|---|---|"]
    for c in results.get("comparisons", []):
        ci = f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" + (" *" if excludes_zero(c["ci95"]) else "") if c["ci95"] else "n/a"
        p = f"{c['p']:.3g}" if math.isfinite(c["p"]) else "n/a"
        rows.append(f"| {c['a']} | {c['b']} | {c['diff']:+.3f} | {ci} | {p} | {c['n']} |")
    return "\n".join(rows)


def detail_table(results: dict[str, Any]) -> str:
    """Markdown table of per-site Dice (mean ± std over seeds) and HD95 (mm)."""
    sites = results["sites"]
    rows = ["| method | " + " | ".join(f"{s} Dice | {s} HD95 (mm)" for s in sites) + " |", "|---|" + "---|---|" * len(sites)]
    for method, s in results["summary"].items():
        cells = []
        for site in sites:
            hd = s.get("per_site_hd95", {}).get(site, float("nan"))
            spread = f" ± {s.get('per_site_std', {}).get(site, 0.0):.3f}" if len(s["seeds"]) > 1 else ""
            cells.append(f"{s['per_site'][site]:.3f}{spread} | {hd:.1f}")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def results_csv(results: dict[str, Any]) -> str:
    """One row per (method, seed, site)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "seed", "site", "dice", "hd95", "n_test"])
    for run in results["runs"]:
        for site in results["sites"]:
            v = run["per_site"].get(site, {})
            writer.writerow([run["method"], run["seed"], site, v.get("dice", ""), v.get("hd95", ""), v.get("n_test", "")])
    return buf.getvalue()


def rounds_csv(results: dict[str, Any]) -> str:
    """One row per (round, method, seed, site): the learning curves behind every table."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["round", "method", "seed", "site", "dice", "loss", "seconds", "bytes"])
    for run in results["runs"]:
        for entry in run.get("history", []):
            dice, loss = entry.get("dice", {}), entry.get("train_loss", {})
            seconds = entry.get("train_s", 0.0) + entry.get("aggregate_s", 0.0) + entry.get("evaluate_s", 0.0)
            traffic = entry.get("bytes_sent", 0) + entry.get("bytes_received", 0)
            for site in sorted(set(dice) | set(loss)):
                writer.writerow([entry["round"], run["method"], run["seed"], site, dice.get(site, ""), loss.get(site, ""),
                                 f"{seconds:.3f}", traffic])
    return buf.getvalue()


def write_reports(results: dict[str, Any], out: Path) -> str:
    """Write results.json, results.md and results.csv into ``out``; return the Dice table."""
    table = dice_table(results)
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2))
    atomic_write_text(out / "results.csv", results_csv(results))
    atomic_write_text(out / "rounds.csv", rounds_csv(results))
    seeds = sorted({r["seed"] for r in results["runs"]})
    rounds = results["runs"][0]["rounds"] if results["runs"] else 0
    md = [
        f"# {results['experiment']}: per-site Dice",
        "",
        f"Mean foreground Dice on each site's held-out split, scored with that site's own model; "
        f"mean ± std over seeds {seeds} with a 95% bootstrap interval over (seed, site) cells, {rounds} rounds; "
        f"code version {results.get('code_version', 'unknown')}.",
        "",
        table,
        "",
        *(["Paired differences (every federated method against local and FedAvg; * = interval excludes 0):", "",
           comparison_table(results), ""] if results.get("comparisons") else []),
        *_gains_block(results),
        "Per site: Dice (mean ± std over seeds) and 95th-percentile Hausdorff distance (mm, from each case's voxel spacing; mean over seeds):",
        "",
        detail_table(results),
        "",
    ]
    if results.get("command"):
        md += ["Command:", "", f"    {results['command']}", ""]
    atomic_write_text(out / "results.md", "\n".join(md))
    return table


def _gains_block(results: dict[str, Any]) -> list[str]:
    table = site_gains_table(results)
    return [GAINS_CAPTION, "", table, ""] if table else []


def holdout_table(results: dict[str, Any]) -> str:
    """Markdown: Dice on the held-out (never trained) site per adaptation option, mean over seeds."""
    runs = [r for r in results["runs"] if "holdout" in r]
    options = list(dict.fromkeys(k for r in runs for k in r["holdout"] if k != "site"))
    site = runs[0]["holdout"]["site"] if runs else "?"
    rows = [f"| method | " + " | ".join(f"{site}: {o}" for o in options) + " |", "|---|" + "---|" * len(options)]
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        cells = []
        for option in options:
            values = [_as_float(r["holdout"].get(option, {}).get("dice")) for r in mine]  # None = option not applicable
            cells.append(f"{_mean(values):.3f} ± {_std(values):.3f}" if any(math.isfinite(v) for v in values) else "n/a")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
