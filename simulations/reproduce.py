"""``fedsite reproduce``: run the reference experiments and rewrite RESULTS.md.

Each experiment is an ordinary ``fedsite simulate --config simulations/configs/X.yaml``
run into ``<out>/<X>``; finished federations are reused, so an interrupted
reproduction continues. An experiment with a UXNet supernet arm is followed by
its derived retrain experiment (:mod:`.retrain`): ``<out>/<X>-retrain.yaml``, run
the same way into ``<out>/<X>-retrain``. The page (:mod:`.results_page`) is
copied from those runs' results, next to the command that made them, and names
the one code version they all ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from shared_models.config import ConfigError
from shared_models.durable import atomic_write_text
from shared_models.protocol import RESULTS_FILE

from . import run as simulate
from .arch_report import JSON_FILE as ARCH_FILE
from .experiment import ExperimentConfig, load_experiment
from .model_costs import arm_costs, input_size
from .results_page import CodeVersionMismatch, Retrained, Section, code_version, render_page
from .retrain import retrain_config, write_config

EXPERIMENTS = ("fl_baselines", "holdout", "norms", "models", "anatomy", "volumes3d", "convergence", "convergence_anatomy")
EXTRAS = ("sn_weights.md", "architectures.md")


class ReproduceError(RuntimeError):
    """An experiment failed or its results cannot be reported; the message is the one line to print."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--results", type=Path, default=Path("simulations/RESULTS.md"), help="Markdown file to (re)write")
    parser.add_argument("--configs", type=Path, help="folder of the experiment YAMLs (default: simulations/configs)")


def _config_path(name: str, configs: Path | None = None) -> Path:
    if configs is not None:
        return configs / f"{name}.yaml"
    return Path(str(resources.files("simulations.configs").joinpath(f"{name}.yaml")))


def _header(config: Path) -> str:
    """The comment block at the top of an experiment file: what it asks."""
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines)


def simulate_experiment(config: Path, out: Path, name: str) -> tuple[dict[str, Any], str]:
    """``fedsite simulate --config config --out out``; its results and the command."""
    command = f"fedsite simulate --config {config} --out {out}"
    print(f"== {name}: {command}", flush=True)
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    code = simulate.run(parser.parse_args(["--config", str(config), "--out", str(out)]))
    if code != 0:
        raise ReproduceError(f"fedsite reproduce: {name} failed (exit {code})", code)
    return json.loads((out / RESULTS_FILE).read_text()), command


def retrain_experiment(cfg: ExperimentConfig, name: str, out: Path) -> tuple[str, ExperimentConfig, Retrained] | None:
    """The derived retrain experiment of ``name`` (None without a supernet arm): written, run, read back."""
    try:
        report = json.loads((out / name / ARCH_FILE).read_text()) if (out / name / ARCH_FILE).exists() else {"runs": []}
        derived = retrain_config(cfg, report)
    except (ValueError, KeyError) as exc:
        raise ReproduceError(f"fedsite reproduce: {name}: no architecture to retrain ({exc})") from exc
    if derived is None:
        return None
    retrain_cfg, choices = derived
    retrain_name = f"{name}-retrain"
    config = write_config(retrain_cfg, out / f"{retrain_name}.yaml")
    results, command = simulate_experiment(config, out / retrain_name, retrain_name)
    return retrain_name, retrain_cfg, Retrained(results, choices, command)


def run_section(name: str, args: argparse.Namespace, versions: dict[str, dict[str, Any]]) -> Section:
    """Run one experiment (and its retrain); stop at once if it ran on another code version than the others."""
    config = _config_path(name, args.configs)
    try:
        cfg = load_experiment(config)
    except ConfigError as exc:
        raise ReproduceError(f"fedsite reproduce: {exc}", 2) from exc
    out = args.out / name
    display = config if args.configs else Path("simulations/configs") / f"{name}.yaml"
    results, _ = simulate_experiment(config, out, name)
    versions[name] = results
    code_version(versions)
    retrained = retrain_experiment(cfg, name, args.out)
    costs = arm_costs(cfg, results)
    if retrained:
        retrain_name, retrain_cfg, retrained_section = retrained
        versions[retrain_name] = retrained_section.results
        code_version(versions)
        costs.update(arm_costs(retrain_cfg, retrained_section.results))
    return Section(results=results, header=_header(config), command=f"fedsite simulate --config {display} --out {out}",
                   out=out, costs=costs, size=input_size(cfg.data), retrained=retrained[2] if retrained else None,
                   extras=[e for e in EXTRAS if (out / e).exists()])


def run(args: argparse.Namespace) -> int:
    names = [n for n in (args.only.split(",") if args.only else EXPERIMENTS) if n]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(f"fedsite reproduce: unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
        return 2
    versions: dict[str, dict[str, Any]] = {}
    try:
        sections = [run_section(name, args, versions) for name in names]
        version = code_version(versions)
    except CodeVersionMismatch as exc:
        print(f"fedsite reproduce: {exc}", file=sys.stderr)
        return 1
    except ReproduceError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    atomic_write_text(args.results, render_page(sections, version))
    print(f"written: {args.results}")
    return 0
