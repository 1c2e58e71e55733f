"""Tables of an experiment: per-site Dice of each method, mean +- std over seeds."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from shared_models.durable import atomic_write_text


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def _std(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


def summarise(runs: list[dict[str, Any]], sites: list[str]) -> dict[str, Any]:
    """Per method: mean/std over seeds of the mean Dice, and mean Dice per site."""
    summary: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        summary[method] = {
            "mean_dice": _mean([r["mean_dice"] for r in mine]),
            "std": _std([r["mean_dice"] for r in mine]),
            "seeds": [r["seed"] for r in mine],
            "per_site": {s: _mean([r["per_site"].get(s, {}).get("dice", float("nan")) for r in mine]) for s in sites},
        }
    return summary


def dice_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per method, one column per site, mean +- std last."""
    sites = results["sites"]
    header = "| method | " + " | ".join(sites) + " | mean ± std |"
    rule = "|---|" + "---|" * len(sites) + "---|"
    rows = [header, rule]
    for method, s in results["summary"].items():
        cells = " | ".join(f"{s['per_site'][site]:.3f}" for site in sites)
        rows.append(f"| {method} | {cells} | {s['mean_dice']:.3f} ± {s['std']:.3f} |")
    return "\n".join(rows)


def write_reports(results: dict[str, Any], out: Path) -> str:
    """Write results.json and results.md into ``out``; return the Markdown table."""
    table = dice_table(results)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
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
    ]
    if results.get("command"):
        md += ["Command:", "", f"    {results['command']}", ""]
    atomic_write_text(out / "results.md", "\n".join(md))
    return table
