"""``fedsite simulate``: methods x seeds of one experiment on Flower's simulation engine.

Every cell of the matrix is a full federation of our ServerApp and ClientApp
(real site folders on disk, real site-state files, real Flower messages); only
the transport differs from a deployment. Results go to ``--out`` as
``results.json`` / ``results.md`` and a per-site Dice table on the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from shared_models.config import ConfigError
from shared_models.durable import atomic_write_text

from .experiment import Arm, ExperimentConfig, load_experiment, with_overrides
from .methods import METHODS


def _csv(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from exc

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment YAML (default: the embedded domain-shift demo)")
    parser.add_argument("--data", type=Path, dest="data_dir", help="multi-site folder DIR/<site>/images|labels/*.nii.gz")
    parser.add_argument("--methods", type=_csv(str), help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--model", dest="model_name", help="registered model for every arm (see `fedsite models`)")
    parser.add_argument("--norm", help="registered norm for every arm (batch, instance, group, layer, iln, bin, switchable)")
    parser.add_argument("--loss", choices=("dicece", "selfreg"), help="training loss for every arm")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-epochs", type=int)
    parser.add_argument("--seeds", type=_csv(int), help="comma-separated integers")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--cpus-per-site", type=float, help="CPU share of each simulated site")
    parser.add_argument("--gpus-per-site", type=float, help="GPU share of each simulated site (e.g. 0.25)")
    parser.add_argument("--out", type=Path, default=Path("runs/simulate"), help="output folder (default: runs/simulate)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's own log")


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_experiment(args.config)
    resources = cfg.client_resources
    if args.cpus_per_site is not None or args.gpus_per_site is not None:
        from dataclasses import replace

        resources = replace(
            resources,
            num_cpus=args.cpus_per_site if args.cpus_per_site is not None else resources.num_cpus,
            num_gpus=args.gpus_per_site if args.gpus_per_site is not None else resources.num_gpus,
        )
    return with_overrides(
        cfg,
        data_dir=args.data_dir,
        methods=args.methods,
        model_name=args.model_name,
        norm=args.norm,
        loss=args.loss,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        seeds=args.seeds,
        lr=args.lr,
        batch_size=args.batch_size,
        device=args.device,
        client_resources=resources,
    )


def prepare_data(cfg: ExperimentConfig, out: Path) -> tuple[Path, list[str], int, int]:
    """Data root, site names, number of classes and spatial dims of the experiment."""
    from client.data import infer_num_classes, list_sites, load_site

    if cfg.data.dir:
        root = Path(cfg.data.dir)
        sites = list(cfg.data.sites) or list_sites(root)
    else:
        from .domain_shift import DEFAULT_PROFILES, generate_dataset

        syn = cfg.data.synthetic
        if not 1 <= syn.sites <= len(DEFAULT_PROFILES):
            raise ConfigError(f"data.synthetic.sites: between 1 and {len(DEFAULT_PROFILES)}, got {syn.sites}")
        root = generate_dataset(
            out / "data",
            profiles=DEFAULT_PROFILES[: syn.sites],
            cases_per_site=syn.cases_per_site,
            spatial_dims=syn.spatial_dims,
            size=syn.size,
            num_classes=syn.num_classes,
            seed=syn.seed,
        )
        sites = [p.name for p in DEFAULT_PROFILES[: syn.sites]]
    num_classes = infer_num_classes(root, sites)
    first = load_site(root / sites[0], test_fraction=cfg.data.test_fraction, split_seed=cfg.data.split_seed, intensity=cfg.data.intensity)
    return root.resolve(), sites, num_classes, first.spatial_dims


def run_config_for(cfg: ExperimentConfig, arm: Arm, seed: int, root: Path, sites: list[str], model: dict[str, Any], cell_dir: Path) -> dict[str, Any]:
    """The ServerApp run_config of one (arm, seed) cell."""
    m = METHODS[arm.method]
    return {
        "model": json.dumps({**model, **arm.model}),
        "model-schedule": json.dumps({str(k): v for k, v in arm.model_schedule.items()}),
        "run-name": f"{arm.label}-seed{seed}",
        "loss": arm.loss or cfg.loss,
        "out-dir": str(cell_dir),
        "num-rounds": cfg.rounds,
        "local-epochs": cfg.local_epochs,
        "lr": cfg.lr,
        "batch-size": cfg.batch_size,
        "seed": seed,
        "policy": m.policy,
        "policy-overrides": json.dumps({**m.policy_overrides, **arm.policy_overrides}),
        "strategy": m.strategy,
        "strategy-options": json.dumps(m.strategy_options),
        "proximal-mu": m.proximal_mu,
        "device": cfg.device,
        "amp": cfg.amp,
        "channels-last": cfg.channels_last,
        "intensity": cfg.data.intensity,
        "test-fraction": cfg.data.test_fraction,
        "split-seed": cfg.data.split_seed,
        "pooled": m.pooled,
        "data-dir": str(root),
        "sites": ",".join(sites),
        "state-dir": str(cell_dir / "site-state"),
        "resume": False,
    }


def run(args: argparse.Namespace) -> int:
    from .engine import run_simulated_federation
    from .report import summarise, write_reports

    try:
        cfg = resolve_config(args)
    except ConfigError as exc:
        print(f"fedsite simulate: configuration error: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        root, sites, num_classes, spatial_dims = prepare_data(cfg, out)
    except (ValueError, OSError) as exc:
        print(f"fedsite simulate: data error: {exc}", file=sys.stderr)
        return 2
    model = {**cfg.model, "spatial-dims": spatial_dims, "in-channels": 1, "out-channels": num_classes}
    arms = cfg.all_arms
    cells = [(a, s) for a in arms for s in cfg.seeds]
    print(f"fedsite simulate: {len(sites)} sites ({', '.join(sites)}), {num_classes} classes, {spatial_dims}D; "
          f"{len(arms)} arms x {len(cfg.seeds)} seeds, {cfg.rounds} rounds of {cfg.local_epochs} local epoch(s)", flush=True)
    runs = []
    started = time.perf_counter()
    for i, (arm, seed) in enumerate(cells, 1):
        method = arm.label
        print(f"[{i}/{len(cells)}] {method} seed {seed} ...", flush=True)
        cell_dir = out / "runs" / f"{method}-seed{seed}"
        run_config = run_config_for(cfg, arm, seed, root, sites, model, cell_dir)
        nodes = len(sites) + (1 if METHODS[arm.method].pooled else 0)
        t0 = time.perf_counter()
        try:
            fed = run_simulated_federation(run_config, nodes, cfg.client_resources.num_cpus, cfg.client_resources.num_gpus, args.verbose)
        except Exception as exc:  # the engine re-raises the ServerApp's exception
            print(f"fedsite simulate: {method} seed {seed} failed: {exc}", file=sys.stderr)
            return 1
        runs.append(
            {
                "method": method,
                "federated_method": arm.method,
                "model": json.loads(run_config["model"]),
                "seed": seed,
                "rounds": fed["rounds"],
                "per_site": {s: {"dice": v["dice"], "n_test": v.get("n_test", 0)} for s, v in fed["per_site"].items()},
                "mean_dice": fed["mean_dice"],
                "wall_s": time.perf_counter() - t0,
                "bytes_sent": fed["bytes_sent"],
                "bytes_received": fed["bytes_received"],
                "history": fed["history"],
            }
        )
        print(f"      mean Dice {fed['mean_dice']:.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    results = {
        "experiment": cfg.name,
        "sites": sites,
        "num_classes": num_classes,
        "runs": runs,
        "summary": summarise(runs, sites),
        "wall_s": time.perf_counter() - started,
        "command": "fedsite " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("fedsite") else None,
    }
    table = write_reports(results, out)
    print()
    print(table)
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}  (total {results['wall_s']:.0f} s)")
    from .sn_report import uses_switchable, write_sn_report

    if any(uses_switchable(r["model"]) for r in runs):
        print("Switchable Norm IN/LN/BN weights per layer and site: " + ", ".join(map(str, write_sn_report(out, results))))
    return 0
