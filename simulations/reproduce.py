"""``fedsite reproduce``: run the reference experiments and rewrite RESULTS.md.

Each experiment is an ordinary ``fedsite simulate --config simulations/configs/X.yaml``
run into ``<out>/<X>``; finished federations are reused, so an interrupted
reproduction continues. The tables in RESULTS.md are copied from those runs'
results, next to the command that made them.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

from shared_models.durable import atomic_write_text
from shared_models.protocol import RESULTS_FILE

from . import run as simulate
from .report import dice_table, holdout_table

EXPERIMENTS = ("fl_baselines", "holdout", "norms", "models", "anatomy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--results", type=Path, default=Path("simulations/RESULTS.md"), help="Markdown file to (re)write")


def _config_path(name: str) -> Path:
    return Path(str(resources.files("simulations.configs").joinpath(f"{name}.yaml")))


def _header(config: Path) -> str:
    """The comment block at the top of an experiment file: what it asks."""
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines)


def run(args: argparse.Namespace) -> int:
    names = [n for n in (args.only.split(",") if args.only else EXPERIMENTS) if n]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(f"fedsite reproduce: unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
        return 2
    sections = ["# Results", "",
                "Every table below was produced by `fedsite reproduce` (or the per-experiment command shown), "
                "on the data the experiment names; Dice is the mean foreground Dice on each site's held-out split, "
                "scored with that site's own model, mean ± std over seeds.", ""]
    total_cells_s = 0.0
    for name in names:
        config = _config_path(name)
        out = args.out / name
        command = f"fedsite simulate --config simulations/configs/{name}.yaml --out {out}"
        print(f"== {name}: {command}", flush=True)
        parser = argparse.ArgumentParser()
        simulate.add_arguments(parser)
        code = simulate.run(parser.parse_args(["--config", str(config), "--out", str(out)]))
        if code != 0:
            print(f"fedsite reproduce: {name} failed (exit {code})")
            return code
        results = json.loads((out / RESULTS_FILE).read_text())
        sections += [f"## {results['experiment']}", "", _header(config), "", dice_table(results), ""]
        if any("holdout" in r for r in results["runs"]):
            sections += ["Held-out site, by adaptation option:", "", holdout_table(results), ""]
        for extra in ("sn_weights.md", "architectures.md"):
            if (out / extra).exists():
                sections += [f"Details: `{out / extra}`.", ""]
        cells_s = sum(float(r.get("wall_s", 0.0)) for r in results["runs"])
        total_cells_s += cells_s
        sections += [f"Command: `{command}` ({len(results['runs'])} federations, {cells_s:.0f} s of federation wall time; "
                     f"report: `{out / 'report.md'}`)", ""]
    sections += [f"Federation wall time of all experiments: {total_cells_s:.0f} s "
                 f"(finished federations are reused, so this counts the run that computed each one).", ""]
    atomic_write_text(args.results, "\n".join(sections))
    print(f"written: {args.results}")
    return 0
