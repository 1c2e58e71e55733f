"""Reports of an experiment: tables (Markdown, CSV, JSON) and plots (PNG).

Every number is the mean over seeds of a per-site score on that site's held-out
split, scored with the site's own model; the spread is the standard deviation
over seeds.
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
        }
    return summary


def dice_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per method, one column per site, mean +- std last."""
    sites = results["sites"]
    rows = ["| method | " + " | ".join(sites) + " | mean ± std |", "|---|" + "---|" * len(sites) + "---|"]
    for method, s in results["summary"].items():
        cells = " | ".join(f"{s['per_site'][site]:.3f}" for site in sites)
        rows.append(f"| {method} | {cells} | {s['mean_dice']:.3f} ± {s['std']:.3f} |")
    return "\n".join(rows)


def detail_table(results: dict[str, Any]) -> str:
    """Markdown table of per-site Dice (mean ± std over seeds) and HD95 (voxels)."""
    sites = results["sites"]
    rows = ["| method | " + " | ".join(f"{s} Dice | {s} HD95" for s in sites) + " |", "|---|" + "---|---|" * len(sites)]
    for method, s in results["summary"].items():
        cells = []
        for site in sites:
            hd = s.get("per_site_hd95", {}).get(site, float("nan"))
            cells.append(f"{s['per_site'][site]:.3f} ± {s.get('per_site_std', {}).get(site, 0.0):.3f} | {hd:.1f}")
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


def write_reports(results: dict[str, Any], out: Path) -> str:
    """Write results.json, results.md and results.csv into ``out``; return the Dice table."""
    table = dice_table(results)
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2))
    atomic_write_text(out / "results.csv", results_csv(results))
    seeds = sorted({r["seed"] for r in results["runs"]})
    rounds = results["runs"][0]["rounds"] if results["runs"] else 0
    md = [
        f"# {results['experiment']}: per-site Dice",
        "",
        f"Mean foreground Dice on each site's held-out split, scored with that site's own model; "
        f"mean ± std over seeds {seeds}, {rounds} rounds.",
        "",
        table,
        "",
        "Per site: Dice (mean ± std over seeds) and 95th-percentile Hausdorff distance (voxels, mean over seeds):",
        "",
        detail_table(results),
        "",
    ]
    if results.get("command"):
        md += ["Command:", "", f"    {results['command']}", ""]
    atomic_write_text(out / "results.md", "\n".join(md))
    return table


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
