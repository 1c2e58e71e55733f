"""UXNet search report: which architecture did the federation (or each site) find?

For every run of a finished ``fedsite simulate`` folder whose model is ``uxnet``,
the supernet is rebuilt as the sites evaluate it: ``build_model(spec)`` + the
global shared tensors of the run's latest server checkpoint
(:class:`~server.checkpoint.CheckpointStore`) + a site's local tensors
(:class:`~client.site_state.SiteStateStore`). Then
:func:`shared_models.nets.uxnet_search.architecture_summary` gives the arg-max operator
of every block, the top-k inputs of every decoder node and all softmax weights.

* alpha/beta shared (fedavg, fedbn, silobn...): one architecture, the
  federation's. Local tensors are norms only and do not change alpha/beta; the
  first site that has a store is loaded for completeness (``loaded_site``).
* alpha/beta local (the ``local`` policy): one architecture per site.

Written as ``architectures.json`` (per run: policy, round, and the summaries)
and ``architectures.md`` (per run: chosen op per block with the op weights, top
inputs per decoder node with all input weights; per arm: whether the seeds
agree). The ``arch`` dict of a summary is a ready ``fixed-arch`` for retraining
the discretised network. Usable on its own: ``python -m simulations.arch_report OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from shared_models.durable import atomic_write_text
from shared_models.protocol import RESULTS_FILE

from .cells import Cell

JSON_FILE, MD_FILE = "architectures.json", "architectures.md"
FEDERATION = "federation"


def uses_uxnet(spec: Any) -> bool:
    return isinstance(spec, dict) and spec.get("name") == "uxnet"


def _is_arch_key(key: str) -> bool:
    return key.endswith((".alpha", ".beta"))


def run_architectures(cell: Cell, sites: list[str]) -> dict[str, Any]:
    """``{"round", "arch_local", "loaded_site", "architectures": {FEDERATION or site: summary}}`` of one run."""
    from shared_models.nets.uxnet_search import architecture_summary

    _, split, fingerprint = cell.build()
    arch_local = any(_is_arch_key(k) for k in split.local)
    with_state = [s for s in sites if not split.local or cell.site_store(s).exists()]
    for site in sorted(set(sites) - set(with_state)):
        print(f"arch_report: {cell.path}: no site state for {site}; skipped", file=sys.stderr)
    found: dict[str, Any] = {}
    loaded_site = None
    if arch_local:
        for site in with_state:
            found[site] = architecture_summary(cell.personalised_model(site))
    elif with_state:
        loaded_site = with_state[0] if split.local else None
        found[FEDERATION] = architecture_summary(cell.personalised_model(with_state[0]))
    return {"round": cell.checkpoint(fingerprint).round, "arch_local": arch_local, "loaded_site": loaded_site, "architectures": found}


def collect(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Per run of ``results`` with a uxnet model: its architectures (see the module docstring)."""
    runs = []
    for run in results["runs"]:
        if not uses_uxnet(run["model"]):
            continue
        run_name = f"{run['method']}-seed{run['seed']}"
        cell = Cell(out / "runs" / run_name)
        try:
            policy = cell.policy.name
            entry = run_architectures(cell, list(results["sites"]))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            print(f"arch_report: {run_name} skipped: {exc}", file=sys.stderr)
            continue
        runs.append({"run": run_name, "method": run["method"], "seed": run["seed"], "policy": policy,
                     "model": run["model"], "mean_dice": run.get("mean_dice"), **entry})
    return {"experiment": results.get("experiment"), "runs": runs}


def _fmt(weights: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(weights.items(), key=lambda kv: -kv[1]))


def _agreement(runs: list[dict[str, Any]]) -> list[str]:
    """Per arm: blocks whose chosen op, and nodes whose top inputs, are the same in every run and site."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        arms.setdefault(r["method"], []).extend(r["architectures"].values())
    lines = []
    for arm, summaries in arms.items():
        archs = [s["arch"] for s in summaries]
        ops = [b for b in archs[0]["ops"] if len({a["ops"][b] for a in archs}) == 1]
        nodes = [n for n in archs[0]["inputs"] if len({tuple(a["inputs"][n]) for a in archs}) == 1]
        lines.append(f"- **{arm}** ({len(archs)} architectures): same op in {len(ops)}/{len(archs[0]['ops'])} blocks, "
                     f"same top inputs in {len(nodes)}/{len(archs[0]['inputs'])} nodes")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# UXNet architectures found ({report.get('experiment') or 'simulate'})", ""]
    lines += ["alpha/beta shared: the federation's architecture; local (policy `local`): one per site. "
              "Weights are softmax(alpha) per block and softmax(beta) per node; `top` is the discretised "
              "node's inputs with the renormalised weights.", ""]
    if not report["runs"]:
        return "\n".join(lines + ["No uxnet run found.", ""])
    lines += ["## Agreement", "", *_agreement(report["runs"]), ""]
    for r in report["runs"]:
        dice = f", mean Dice {r['mean_dice']:.4f}" if isinstance(r.get("mean_dice"), (int, float)) else ""
        lines += [f"## {r['run']} (policy {r['policy']}, round {r['round']}{dice})", ""]
        for who, s in r["architectures"].items():
            title = "federation" if who == FEDERATION else f"site {who}"
            extra = f" (norms of {r['loaded_site']})" if who == FEDERATION and r.get("loaded_site") else ""
            lines += [f"### {title}{extra}", "", "| block | chosen | op weights |", "|---|---|---|"]
            lines += [f"| {b} | {v['chosen']} | {_fmt(v['weights'])} |" for b, v in s["blocks"].items()]
            lines += ["", "| node | level | top inputs | input weights |", "|---|---|---|---|"]
            for n, v in s["nodes"].items():
                top = ", ".join(f"{k} {w:.2f}" for k, w in s["arch"]["inputs"][n].items())
                lines.append(f"| {n} | {v['level']} | {top} | {_fmt(v['weights'])} |")
            lines.append("")
    return "\n".join(lines)


def write_arch_report(out: Path, results: dict[str, Any] | None = None) -> list[Path]:
    """Write ``architectures.json`` and ``architectures.md`` under ``out``; returns their paths."""
    out = Path(out)
    if results is None:
        results = json.loads((out / RESULTS_FILE).read_text())
    report = collect(out, results)
    paths = [out / JSON_FILE, out / MD_FILE]
    atomic_write_text(paths[0], json.dumps(report, indent=2))
    atomic_write_text(paths[1], render_markdown(report))
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m simulations.arch_report OUT", file=sys.stderr)
        return 2
    for p in write_arch_report(Path(argv[0])):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
