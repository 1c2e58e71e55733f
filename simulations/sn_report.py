"""Switchable Norm analysis: do different sites want different normalizers?

For every run of a finished ``fedsite simulate`` folder whose model uses
Switchable Normalization (as the base norm or inside another backbone), each
site's personalised model is rebuilt exactly as that site evaluates it:
``build_model(spec)`` + the global shared tensors of the run's latest server
checkpoint (:class:`~server.checkpoint.CheckpointStore`) + the site's own local
tensors (:class:`~client.site_state.SiteStateStore`). The softmaxed importance
weights ``softmax(lambda)`` of every SN layer (IN/LN/BN, for the mean and the
variance) are then averaged over seeds and written as

* ``sn_weights.json``: per arm, per run and seed-averaged weights (with std);
* ``sn_weights.md``: per arm, layer x site tables for the mean and the variance
  weights, plus the largest between-site difference of each layer;
* ``sn_weights.png``: per-site stacked bars (IN/LN/BN) per layer.

The site-local keys are read off the checkpoint (every key not in its shared
"arrays" is site-local: the partition covers each key exactly once), so the
policy overrides of the arm need not be known. Under a policy that shares the
mixing weights (FedAvg, SiloBN...) every site has the same weights; the report
says so (``local_mixing: false``). Usable on its own:
``python -m simulations.sn_report OUT``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from shared_models.durable import atomic_write_text
from shared_models.protocol import RESULTS_FILE

from .cells import Cell

BRANCHES = ("in", "ln", "bn")
STATS = ("mean", "var")
JSON_FILE, MD_FILE, PNG_FILE = "sn_weights.json", "sn_weights.md", "sn_weights.png"
COLOURS = {"in": "#4C72B0", "ln": "#DD8452", "bn": "#55A868"}


def uses_switchable(spec: Any) -> bool:
    """Whether a model spec (possibly nested: a backbone's spec) names the ``switchable`` norm."""
    if isinstance(spec, dict):
        return any(uses_switchable(v) for v in spec.values())
    if isinstance(spec, (list, tuple)):
        return any(uses_switchable(v) for v in spec)
    return spec == "switchable"


def site_weights(cell: Cell, sites: list[str]) -> tuple[dict[str, Any], bool]:
    """``{site: {layer: {"mean": [in, ln, bn], "var": [...]}}}`` of one run, and whether the mixing was local."""
    from shared_models.norms.switchable import switchable_weights

    _, split, _ = cell.build()
    local_mixing = any(k.endswith(("mean_weight", "var_weight")) for k in split.local)
    out: dict[str, Any] = {}
    for site in sites:
        if split.local and not cell.site_store(site).exists():
            print(f"sn_report: {cell.site_store(site).path} missing; site {site} skipped", file=sys.stderr)
            continue
        out[site] = switchable_weights(cell.personalised_model(site))
    return out, local_mixing


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The analysis of every switchable run of ``results`` (see the module docstring)."""
    sites = results["sites"]
    arms: dict[str, Any] = {}
    for run in results["runs"]:
        if not uses_switchable(run["model"]):
            continue
        arm, seed = run["method"], run["seed"]
        run_name = f"{arm}-seed{seed}"
        cell = Cell(out / "runs" / run_name)
        weights, local_mixing = site_weights(cell, sites)
        entry = arms.setdefault(
            arm,
            {"model": run["model"], "federated_method": run.get("federated_method", arm), "policy": cell.policy.name,
             "local_mixing": local_mixing, "seeds": [], "per_run": {}},
        )
        entry["seeds"].append(seed)
        entry["per_run"][f"seed{seed}"] = weights
    for entry in arms.values():
        runs = list(entry["per_run"].values())
        entry["sites"] = [s for s in sites if all(s in r for r in runs)]
        entry["layers"] = list(runs[0][entry["sites"][0]]) if entry["sites"] else []
        summary: dict[str, Any] = {}
        for site in entry["sites"]:
            summary[site] = {}
            for layer in entry["layers"]:
                cell = {}
                for stat in STATS:
                    pairs = [_mean_std([r[site][layer][stat][b] for r in runs]) for b in range(len(BRANCHES))]
                    cell[stat] = {"avg": [p[0] for p in pairs], "std": [p[1] for p in pairs]}
                summary[site][layer] = cell
        entry["summary"] = summary
        # Largest difference between two sites of one seed-averaged branch weight, per layer and statistic.
        entry["site_spread"] = {
            layer: {
                stat: max(
                    (max(summary[s][layer][stat]["avg"][b] for s in entry["sites"]) - min(summary[s][layer][stat]["avg"][b] for s in entry["sites"]))
                    for b in range(len(BRANCHES))
                )
                if entry["sites"]
                else 0.0
                for stat in STATS
            }
            for layer in entry["layers"]
        }
    return {
        "description": "softmax(lambda) of every Switchable Norm layer, per site (global shared + that site's local tensors), "
        "as [IN, LN, BN] for the mean and the variance; 'summary' averages over seeds ('avg') with the std over seeds ('std'); "
        "'site_spread' is, per layer, the largest between-site difference of one branch weight.",
        "branches": list(BRANCHES),
        "sites": sites,
        "arms": arms,
    }


def _cell(c: dict[str, list[float]]) -> str:
    avg, spread = c["avg"], max(c["std"])
    text = " / ".join(f"{v:.2f}" for v in avg)
    return f"{text} ±{spread:.2f}" if spread > 0 else text


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Switchable Norm: learned IN/LN/BN weights per layer and site",
        "",
        "Each cell is IN / LN / BN = softmax(λ) of one SN layer in that site's personalised model "
        "(global shared tensors + the site's local tensors), averaged over seeds; ± is the largest std over seeds "
        "of the three. *spread* = largest between-site difference of one branch weight in that layer.",
        "",
    ]
    for arm, e in report["arms"].items():
        seeds = ", ".join(map(str, e["seeds"]))
        where = "local (each site learns its own mix)" if e["local_mixing"] else "shared (every site has the same mix)"
        lines += [f"## {arm}", "", f"{e['federated_method']} (policy {e['policy']}), seeds {seeds}; mixing weights {where}.", ""]
        for stat in STATS:
            lines += [f"### {stat} weights (IN / LN / BN)", "",
                      "| layer | " + " | ".join(e["sites"]) + " | spread |", "|---|" + "---|" * (len(e["sites"]) + 1)]
            for layer in e["layers"]:
                cells = " | ".join(_cell(e["summary"][s][layer][stat]) for s in e["sites"])
                lines.append(f"| {layer} | {cells} | {e['site_spread'][layer][stat]:.2f} |")
            lines.append("")
        dominant = {s: {b: 0 for b in BRANCHES} for s in e["sites"]}
        for s in e["sites"]:
            for layer in e["layers"]:
                for stat in STATS:
                    avg = e["summary"][s][layer][stat]["avg"]
                    dominant[s][BRANCHES[max(range(len(avg)), key=avg.__getitem__)]] += 1
        lines += ["Dominant branch (count over layers x {mean, var}): " + "; ".join(
            f"{s}: " + ", ".join(f"{b.upper()} {n}" for b, n in d.items()) for s, d in dominant.items()), ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Per arm and statistic a row, per site a column: stacked IN/LN/BN bars per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [(arm, stat) for arm in report["arms"] for stat in STATS]
    ncols = max((len(e["sites"]) for e in report["arms"].values()), default=1) or 1
    nlayers = max((len(e["layers"]) for e in report["arms"].values()), default=1) or 1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.6 * ncols + 1.6, 0.26 * nlayers * len(rows) + 1.2 * len(rows) + 1.4),
                             squeeze=False, sharey="row")
    for r, (arm, stat) in enumerate(rows):
        e = report["arms"][arm]
        layers = e["layers"]
        ys = range(len(layers))
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(e["sites"]):
                ax.axis("off")
                continue
            site = e["sites"][c]
            left = [0.0] * len(layers)
            for b, branch in enumerate(BRANCHES):
                widths = [e["summary"][site][layer][stat]["avg"][b] for layer in layers]
                ax.barh(list(ys), widths, left=left, color=COLOURS[branch], edgecolor="white", linewidth=0.4, height=0.8)
                left = [a + w for a, w in zip(left, widths)]
            ax.set_xlim(0, 1)
            ax.set_xticks([0, 0.5, 1])
            ax.tick_params(labelsize=7)
            if r == 0 or len(report["arms"]) > 1:
                ax.set_title(site, fontsize=9, fontweight="bold")
            if c == 0:
                ax.set_yticks(list(ys))
                ax.set_yticklabels(layers, fontsize=7)
                ax.invert_yaxis()
                ax.set_ylabel(f"{arm}\n{stat} weights", fontsize=9)
            if r == len(rows) - 1:
                ax.set_xlabel("importance weight", fontsize=7)
    seeds = sorted({s for e in report["arms"].values() for s in e["seeds"]})
    fig.suptitle("Switchable Norm: learned IN/LN/BN importance weights per layer (rows) and site (columns)", fontsize=10)
    fig.text(0.5, 0.005, f"softmax(λ) of each SN layer in each site's personalised model, mean over seeds {seeds}; "
             "segments sum to 1 (IN blue, LN orange, BN green). Different patterns between columns = sites chose different normalizers.",
             ha="center", va="bottom", fontsize=7, wrap=True)
    fig.legend(handles=[Patch(color=COLOURS[b], label=b.upper()) for b in BRANCHES], loc="upper center", bbox_to_anchor=(0.5, 0.965),
               ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)


def write_sn_report(out: Path, results: dict[str, Any] | None = None) -> list[Path]:
    """Write sn_weights.json/.md/.png into ``out``; returns their paths (empty if no switchable run)."""
    out = Path(out)
    if results is None:
        results = json.loads((out / RESULTS_FILE).read_text())
    report = collect(out, results)
    if not report["arms"]:
        return []
    paths = [out / JSON_FILE, out / MD_FILE, out / PNG_FILE]
    atomic_write_text(paths[0], json.dumps(report, indent=2))
    atomic_write_text(paths[1], markdown(report))
    plot(report, paths[2])
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m simulations.sn_report OUT  (a finished `fedsite simulate --out OUT` folder)", file=sys.stderr)
        return 2
    paths = write_sn_report(Path(args[0]))
    if not paths:
        print("sn_report: no run used Switchable Norm", file=sys.stderr)
        return 1
    print("\n".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
