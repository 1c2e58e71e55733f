"""UXNet search report: which architecture did the federation (or each site) find?

For every run of a finished ``fedsite simulate`` folder whose model is ``uxnet``,
the supernet is rebuilt as the sites evaluate it: ``build_model(spec)`` + the
global shared tensors of the run's latest server checkpoint
(:class:`~server.checkpoint.CheckpointStore`) + a site's local tensors
(:class:`~client.site_state.SiteStateStore`). Then
:func:`shared_models.nets.uxnet.architecture_summary` gives the arg-max operator
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

JSON_FILE, MD_FILE = "architectures.json", "architectures.md"
FEDERATION = "federation"


def uses_uxnet(spec: Any) -> bool:
    return isinstance(spec, dict) and spec.get("name") == "uxnet"


def _is_arch_key(key: str) -> bool:
    return key.endswith((".alpha", ".beta"))


def run_architectures(cell_dir: Path, run_name: str, spec: dict[str, Any], sites: list[str], policy: str) -> dict[str, Any]:
    """``{"round", "arch_local", "loaded_site", "architectures": {FEDERATION or site: summary}}`` of one run."""
    from client.exchange import load_local
    from client.site_state import SiteStateStore
    from server.checkpoint import CheckpointStore
    from shared_models import architecture_fingerprint, build_model
    from shared_models.nets.uxnet import architecture_summary

    model = build_model(spec)
    fingerprint = architecture_fingerprint(model)
    ckpt = CheckpointStore(cell_dir / "checkpoints").latest(run_name=run_name, fingerprint=fingerprint, policy=policy)
    if ckpt is None:
        raise FileNotFoundError(f"{cell_dir / 'checkpoints'}: no server checkpoint for run {run_name!r}")
    base = model.state_dict()
    unknown = sorted(set(ckpt.arrays) - set(base))
    if unknown:
        raise ValueError(f"{cell_dir}: checkpoint holds tensors the model lacks ({unknown[:3]})")
    local_keys = set(base) - set(ckpt.arrays)  # the partition covers every key once
    arch_local = any(_is_arch_key(k) for k in local_keys)

    def load(site: str | None) -> bool:
        state = dict(base)
        for key, value in ckpt.arrays.items():
            state[key] = value.reshape(base[key].shape).to(base[key].dtype)
        model.load_state_dict(state, strict=True)
        if site is None or not local_keys:
            return True
        store = SiteStateStore(cell_dir / "site-state" / site, run_name, site)
        if not store.exists():
            return False
        tensors, _ = store.load(fingerprint=fingerprint, policy=policy, expected_keys=local_keys)
        load_local(model, tensors)
        return True

    found: dict[str, Any] = {}
    loaded_site = None
    if arch_local:
        for site in sites:
            if load(site):
                found[site] = architecture_summary(model)
            else:
                print(f"arch_report: {cell_dir}: no site state for {site}; skipped", file=sys.stderr)
    else:
        loaded_site = next((s for s in sites if local_keys and load(s)), None)
        if loaded_site is None:
            load(None)
        found[FEDERATION] = architecture_summary(model)
    return {"round": ckpt.round, "arch_local": arch_local, "loaded_site": loaded_site, "architectures": found}


def collect(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Per run of ``results`` with a uxnet model: its architectures (see the module docstring)."""
    runs = []
    for run in results["runs"]:
        if not uses_uxnet(run["model"]):
            continue
        run_name = f"{run['method']}-seed{run['seed']}"
        cell = out / "runs" / run_name
        try:
            policy = json.loads((cell / "federation.json").read_text())["policy"]
            entry = run_architectures(cell, run_name, run["model"], list(results["sites"]), policy)
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
        results = json.loads((out / "results.json").read_text())
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
