"""A deployment's ``results.json`` (the schema of ``fedsite simulate``) and its per-site table."""

from __future__ import annotations

import math
import sys
from typing import Any

from .server_config import ServerConfig


def summarise(fed: dict[str, Any], cfg: ServerConfig, wall_s: float) -> dict[str, Any]:
    """``results.json`` in the schema of ``fedsite simulate`` (one run, one seed)."""
    sites = list(fed.get("sites") or sorted(fed.get("per_site", {})))
    per_site = {s: {"dice": v["dice"], "n_test": v.get("n_test", 0)} for s, v in fed.get("per_site", {}).items()}
    finite = [v["dice"] for v in per_site.values() if isinstance(v["dice"], (int, float)) and math.isfinite(v["dice"])]
    mean = sum(finite) / len(finite) if finite else float("nan")
    model = cfg.federation.model
    run = {
        "method": cfg.run_name,
        "federated_method": cfg.federation.policy,
        "model": model,
        "seed": cfg.federation.seed,
        "rounds": fed.get("rounds", cfg.federation.rounds),
        "per_site": per_site,
        "mean_dice": mean,
        "wall_s": wall_s,
        "bytes_sent": fed.get("bytes_sent", 0),
        "bytes_received": fed.get("bytes_received", 0),
        "history": fed.get("history", []),
        "resumed_from": fed.get("resumed_from", 0),
    }
    summary = {cfg.run_name: {"mean_dice": mean, "std": 0.0, "seeds": [cfg.federation.seed],
                              "per_site": {s: per_site.get(s, {}).get("dice", float("nan")) for s in sites}}}
    return {
        "experiment": cfg.run_name,
        "sites": sites,
        "num_classes": int(model.get("out-channels", model.get("out_channels", 0))),
        "runs": [run],
        "summary": summary,
        "wall_s": wall_s,
        "command": "fedsite " + " ".join(sys.argv[1:]),
    }


def site_table(results: dict[str, Any]) -> str:
    run = results["runs"][0]
    rows = ["| site | Dice | test cases |", "|---|---|---|"]
    for site in results["sites"]:
        v = run["per_site"].get(site, {})
        rows.append(f"| {site} | {v.get('dice', float('nan')):.3f} | {v.get('n_test', 0)} |")
    rows.append(f"| mean | {run['mean_dice']:.3f} | |")
    return "\n".join(rows)
