"""``fedsite simulate``: methods x seeds of one experiment on Flower's simulation engine.

Every cell of the matrix is a full federation of our ServerApp and ClientApp
(real site folders on disk, real site-state files, real Flower messages); only
the transport differs from a deployment. Results go to ``--out`` as
``results.json`` / ``results.md`` and a per-site Dice table on the terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from server.run_config import ServerRunConfig
from shared_models.config import ConfigError
from shared_models.durable import atomic_write_text
from shared_models.protocol import EVAL_STATISTICS_MODES, LR_SCHEDULES, OPTIMIZERS, RESULTS_FILE, SIM_SITE_STATE
from shared_models.transport import TRANSPORT_DTYPES

from . import interrupt
from .experiment import Cell, DataConfig, ExperimentConfig, with_overrides
from .methods import METHODS, finetune_budget
from .planning import base_experiment, plan_experiment

CELL_RECORD = "cell.json"


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
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help="local optimizer (default adam; sgd: Nesterov 0.99)")
    parser.add_argument("--schedule", dest="lr_schedule", choices=LR_SCHEDULES,
                        help="learning rate over every round's local steps (default poly)")
    parser.add_argument("--no-augment", dest="augment", action="store_false", default=None, help="no training augmentation")
    parser.add_argument("--reset-optimizer", dest="persist_optimizer", action="store_false", default=None,
                        help="a fresh optimizer every round (default: the site continues its optimizer state)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--patch-size", type=_csv(int),
                        help="train on random patches of this size, e.g. 64,64,48 (default: the plan's; 3D data gets patches)")
    parser.add_argument("--transport-dtype", choices=TRANSPORT_DTYPES,
                        help="dtype the shared tensors travel in, both ways (default fp32; aggregation stays fp32)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--eval-statistics", choices=EVAL_STATISTICS_MODES,
                        help="score with site norm statistics re-estimated under the final weights (refresh, default) "
                             "or as stored by the last local training (stored, as the papers)")
    parser.add_argument("--cpus-per-site", type=float, help="CPU share of each simulated site")
    parser.add_argument("--ray-address", help="HOST:PORT of a running Ray cluster to run the sites on "
                                              "(default: a local Ray instance of this run's own, whatever else runs here)")
    parser.add_argument("--parallel-cells", type=int, help="federations of the matrix run at the same time, each in "
                        "its own process and Ray instance with its share of the cores (default 1; 0: as many as the cores hold)")
    parser.add_argument("--gpus-per-site", type=float, help="GPU share of each simulated site (e.g. 0.25)")
    parser.add_argument("--holdout", help="a site that never trains; scored after each adaptation option")
    parser.add_argument("--out", type=Path, default=Path("runs/simulate"), help="output folder (default: runs/simulate)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's own log")


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    cfg = base_experiment(args.config, args.data_dir)
    resources = cfg.client_resources
    if args.cpus_per_site is not None or args.gpus_per_site is not None:
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
        optimizer=args.optimizer,
        lr_schedule=args.lr_schedule,
        augment=args.augment,
        persist_optimizer=args.persist_optimizer,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        device=args.device,
        eval_statistics=args.eval_statistics,
        transport_dtype=args.transport_dtype,
        holdout=args.holdout,
        client_resources=resources,
        ray_address=args.ray_address,
        parallel_cells=args.parallel_cells,
    )


def prepare_data(data: DataConfig, out: Path) -> tuple[Path, list[str], int, int]:
    """Data root, site names, number of classes and spatial dims of one dataset."""
    from client.case_files import discover_site
    from client.data import infer_num_classes, list_sites, load_site

    from .site_profiles import site_profiles

    if data.dir:
        root = Path(data.dir)
        sites = list(data.sites) or list_sites(root)
    else:
        source = data.anatomy or data.synthetic
        if source.sites < 1:
            raise ConfigError(f"data: sites must be >= 1, got {source.sites}")
        profiles = site_profiles(source.sites)
        if data.anatomy is not None:
            from .anatomy import generate_anatomy_dataset

            root = generate_anatomy_dataset(out / "data-anatomy", profiles=profiles, cases_per_site=source.cases_per_site,
                                            spatial_dims=source.spatial_dims, size=source.size, seed=source.seed)
        else:
            from .domain_shift import generate_dataset

            root = generate_dataset(out / "data", profiles=profiles, cases_per_site=source.cases_per_site,
                                    spatial_dims=source.spatial_dims, size=source.size, num_classes=source.num_classes, seed=source.seed)
        sites = [p.name for p in profiles]
    num_classes = infer_num_classes(root, sites)
    found = [discover_site(root / s) for s in sites]  # headers only: a 3D site is not read whole to learn its dims
    usable = [f for f in found if f.cases]
    if not usable:
        load_site(root / sites[0], test_fraction=data.test_fraction)  # raises the one-line error naming the site
    return root.resolve(), sites, num_classes, usable[0].spatial_dims


def run_config_for(cfg: ExperimentConfig, data: DataConfig, cell: Cell, root: Path, sites: list[str], cell_dir: Path) -> dict[str, Any]:
    """The ServerApp run_config of one cell of the matrix."""
    m = METHODS[cell.arm.method]
    rounds, finetune_epochs = finetune_budget(m, cfg.rounds, cfg.local_epochs)
    return ServerRunConfig(
        model=json.dumps(cell.model),
        model_schedule=json.dumps({str(k): v for k, v in cell.arm.model_schedule.items()}),
        run_name=cell.name,
        loss=cell.arm.loss or cfg.loss,
        out_dir=str(cell_dir),
        num_rounds=rounds,
        local_epochs=cfg.local_epochs,
        lr=cfg.pooled_lr if m.pooled and cfg.pooled_lr is not None else cfg.lr,
        optimizer=cfg.optimizer,
        momentum=cfg.momentum,
        lr_schedule=cfg.lr_schedule,
        warmup_fraction=cfg.warmup_fraction,
        persist_optimizer=cfg.persist_optimizer,
        augment=cfg.augment,
        patch_size=",".join(str(v) for v in cfg.patch_size or ()),
        target_spacing=",".join(f"{v:g}" for v in cfg.target_spacing or ()),
        loader_workers=cfg.loader_workers,
        batch_size=cfg.batch_size,
        seed=cell.seed,
        policy=m.policy,
        policy_overrides=json.dumps({**m.policy_overrides, **cell.arm.policy_overrides}),
        strategy=m.strategy,
        strategy_options=json.dumps(m.strategy_options),
        proximal_mu=m.proximal_mu,
        device=cfg.device,
        amp=cfg.amp,
        channels_last=cfg.channels_last,
        eval_statistics=cfg.eval_statistics,
        transport_dtype=cfg.transport_dtype,
        finetune_epochs=finetune_epochs,
        personal_mu=m.personal_mu,
        intensity=data.intensity,
        test_fraction=data.test_fraction,
        split_seed=data.split_seed + cell.seed,  # each seed its own split, the same for every method
        pooled=m.pooled,
        data_dir=str(root),
        sites=",".join(sites),
        state_dir=str(cell_dir / SIM_SITE_STATE),
        resume=False,
    ).to_run_config()


def finished_run(cell_dir: Path, identity: str) -> dict[str, Any] | None:
    """The stored record of a cell that already finished every round at every site under this identity."""
    record = cell_dir / CELL_RECORD
    if not record.exists():
        return None
    stored = json.loads(record.read_text())
    ok = stored.get("identity") == identity and stored.get("status") == "finished"
    return stored["run"] if ok else None


def degradation(fed: dict[str, Any], sites: list[str]) -> str | None:
    """Why a federation is not a clean result (a site failed, was rejected or offline, a round skipped), or None."""
    for entry in fed["history"]:
        for key in ("failed", "no_reply", "offline", "rejected"):
            if entry.get(key):
                return f"round {entry['round']}: {key.replace('_', ' ')} {sorted(entry[key])}"
        if "skipped" in entry:
            return f"round {entry['round']} skipped: {entry['skipped']}"
    missing = sorted(set(sites) - set(fed["per_site"]))
    return f"no final score for {missing}" if missing else None


def run_cell(cfg: ExperimentConfig, data: DataConfig, cell: Cell, root: Path, sites: list[str], out: Path, verbose: bool,
             ray_cpus: int | None = None) -> tuple[dict[str, Any], bool]:
    """Run one federation (or reuse its finished record); returns (run record, reused)."""
    from .cell_identity import cell_identity, claim_cell_dir, code_version, data_fingerprint
    from .engine import run_simulated_federation
    from .memory_watch import PeakTreeMemory

    cell_dir = out / "runs" / cell.name
    train_sites = [s for s in sites if s != cfg.holdout]
    run_config = run_config_for(cfg, data, cell, root, train_sites, cell_dir)
    code, data_fp = code_version(), data_fingerprint(root, tuple(sites))
    identity = cell_identity(run_config, code, data_fp)
    done = finished_run(cell_dir, identity)
    if done is not None:
        return done, True
    run_config["resume"] = claim_cell_dir(cell_dir, identity, code, data_fp)  # same identity: an interrupted run
    nodes = len(train_sites) + (1 if METHODS[cell.arm.method].pooled else 0)
    t0 = time.perf_counter()
    with PeakTreeMemory() as peak:  # the driver and its Ray workers: what a federation of N sites needs
        fed = run_simulated_federation(run_config, nodes, cfg.client_resources.num_cpus, cfg.client_resources.num_gpus, verbose,
                                       ray_address=cfg.ray_address, ray_cpus=ray_cpus)
    run = run_record(cell, fed, time.perf_counter() - t0)
    run["peak_memory_bytes"] = peak.bytes
    if cfg.holdout:
        from .adapt import adapt_and_score

        scores = adapt_and_score(cell_dir, train_sites, root / cfg.holdout, list(cfg.adapt_options),
                                 model_spec=cell.model, seed=cell.seed, intensity=data.intensity)
        run["holdout"] = {"site": cfg.holdout, **scores}
    reason = degradation(fed, train_sites)
    if reason:
        run["degraded"] = reason
        print(f"      degraded, will rerun next time: {reason}", flush=True)
    status = "degraded" if reason else "finished"
    atomic_write_text(cell_dir / CELL_RECORD, json.dumps({"identity": identity, "code": code, "data": data_fp, "status": status,
                                                          "run_config": run_config, "run": run}, indent=2))
    return run, False


def budget_rounds(fed: dict[str, Any]) -> int:
    """The rounds' worth of training a federation used: its rounds plus any fine-tuning epochs at the site."""
    config = fed.get("config", {})
    tail = int(config.get("finetune-epochs", 0))
    return int(fed["rounds"]) + math.ceil(tail / max(int(config.get("local-epochs", 1)), 1))


def run_record(cell: Cell, fed: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The row of results.json for one finished federation."""
    return {
        "method": cell.label,
        "federated_method": cell.arm.method,
        "model": cell.model,
        "seed": cell.seed,
        "rounds": fed["rounds"],
        "budget_rounds": budget_rounds(fed),
        "per_site": {s: {"dice": v["dice"], "hd95": v.get("hd95", float("nan")), "n_test": v.get("n_test", 0)}
                     for s, v in fed["per_site"].items()},
        "mean_dice": fed["mean_dice"],
        "wall_s": wall_s,
        "bytes_sent": fed["bytes_sent"],
        "bytes_received": fed["bytes_received"],
        "transport_dtype": fed.get("config", {}).get("transport-dtype", "fp32"),
        "tensor_bytes_sent": fed.get("tensor_bytes_sent", 0),
        "tensor_bytes_received": fed.get("tensor_bytes_received", 0),
        "history": fed["history"],
    }


def run(args: argparse.Namespace) -> int:
    try:
        cfg = resolve_config(args)
    except ConfigError as exc:
        print(f"fedsite simulate: configuration error: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cells = cfg.cells()
    datasets = cfg.all_datasets
    print(f"fedsite simulate: {len(cells)} federations ({len(datasets)} dataset(s) x {len(cfg.all_arms)} arm(s) x "
          f"{len(cfg.models) or 1} model(s) x {len(cfg.norms) or 1} norm(s) x {len(cfg.seeds)} seed(s)); "
          f"{cfg.rounds} rounds of {cfg.local_epochs} local epoch(s)", flush=True)
    hint = (f"run the same command again to resume (finished cells are kept, the interrupted one "
            f"continues after its last checkpoint in {out / 'runs'})")
    progress = Progress(len(cells), time.perf_counter(), resume_hint=hint)
    with interrupt.guard(hint):
        for name, data in datasets.items():
            single = len(datasets) == 1
            rc = run_dataset(cfg, name, data, out if single else out / name, progress, args.verbose, cfg.name if single else f"{cfg.name}/{name}")
            if rc:
                return rc
    return 0


@dataclass
class Progress:
    """Cells started so far, out of all, and when the whole matrix started."""

    total: int
    started: float
    done: int = 0
    resume_hint: str = ""  # what a stopped worker of a parallel matrix says


def run_dataset(cfg: ExperimentConfig, name: str, data: DataConfig, ds_out: Path, progress: Progress, verbose: bool, label: str) -> int:
    """Every cell of one dataset, then its tables and reports; a process exit code."""
    from .cell_identity import code_version
    from .report import summarise, write_reports
    from .stats import comparisons
    from .report_page import write_report_page
    from client.data import resolve_in_channels, site_in_channels

    ds_out.mkdir(parents=True, exist_ok=True)
    try:
        root, sites, num_classes, spatial_dims = prepare_data(data, ds_out)
        cfg = plan_experiment(cfg, data, root, sites, ds_out)  # fills only what the experiment left unset
        channels = site_in_channels(root, sites)  # the model's input channels come from the data
        for c in (c for c in cfg.cells() if c.dataset == name):
            resolve_in_channels(c.model, channels)  # an explicit in-channels that disagrees: one-line error
    except (ValueError, OSError) as exc:
        print(f"fedsite simulate: data error ({name}): {exc}", file=sys.stderr)
        return 2
    if cfg.holdout and cfg.holdout not in sites:
        print(f"fedsite simulate: --holdout {cfg.holdout!r} is not a site of {name} ({', '.join(sites)})", file=sys.stderr)
        return 2
    print(f"dataset {name}: {len(sites)} sites ({', '.join(sites)}), {num_classes} classes, {spatial_dims}D"
          + (f"; held out: {cfg.holdout}" if cfg.holdout else ""), flush=True)
    cells = [replace(c, model={**c.model, "spatial-dims": spatial_dims, "in-channels": resolve_in_channels(c.model, channels),
                               "out-channels": num_classes}) for c in cfg.cells() if c.dataset == name]
    runs = run_cells(cfg, data, cells, root, sites, ds_out, progress, verbose)
    if runs is None:
        return 1
    eval_sites = [s for s in sites if s != cfg.holdout]
    results = {
        "experiment": label,
        "code_version": code_version(),
        "sites": eval_sites,
        "num_classes": num_classes,
        "runs": runs,
        "summary": summarise(runs, eval_sites),
        "comparisons": comparisons(runs, eval_sites),
        "wall_s": time.perf_counter() - progress.started,
        "command": "fedsite " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("fedsite") else None,
    }
    print()
    print(write_reports(results, ds_out))
    write_extra_reports(ds_out, results)
    page = write_report_page(ds_out, results, cfg, data, root)
    print(f"\nresults: {ds_out / RESULTS_FILE}, {ds_out / 'results.md'}, {page}  (total {results['wall_s']:.0f} s)")
    return 0


def run_cells(cfg: ExperimentConfig, data: DataConfig, cells: list[Cell], root: Path, sites: list[str], ds_out: Path,
              progress: Progress, verbose: bool) -> list[dict[str, Any]] | None:
    """Every cell's record in matrix order (``parallel-cells`` at a time), or None when one failed (said why)."""
    from .cell_pool import CellFailed, CellJob, auto_parallel, run_jobs

    jobs = [CellJob(cfg, data, c, root, tuple(sites), ds_out, verbose) for c in cells]
    train_sites = len([s for s in sites if s != cfg.holdout])
    parallel = cfg.parallel_cells or auto_parallel(cfg, train_sites, len(jobs))
    first = progress.done
    if parallel > 1:
        print(f"      {len(jobs)} federations, {parallel} at a time (each in its own process and Ray instance)", flush=True)

    def started(i: int) -> None:
        progress.done = first + i + 1
        print(f"[{first + i + 1}/{progress.total}] {cells[i].label} seed {cells[i].seed} ...", flush=True)

    def done(i: int, record: dict[str, Any], reused: bool) -> None:
        tag = f"{cells[i].label} seed {cells[i].seed}: " if parallel > 1 else ""
        print(f"      {tag}mean Dice {record['mean_dice']:.4f}"
              + ("  (finished earlier, reused)" if reused else f"  ({record['wall_s']:.1f} s)"), flush=True)

    try:
        return run_jobs(jobs, parallel, progress.resume_hint, started, done)
    except CellFailed as exc:
        print(f"fedsite simulate: {cells[exc.index].label} seed {cells[exc.index].seed} failed: {exc}", file=sys.stderr)
        return None


def write_extra_reports(out: Path, results: dict[str, Any]) -> None:
    """Method-specific analyses, written only when a run used that method."""
    from .arch_report import uses_uxnet, write_arch_report
    from .sn_report import uses_switchable, write_sn_report

    runs = results["runs"]
    if any(uses_switchable(r["model"]) for r in runs):
        print("Switchable Norm IN/LN/BN weights per layer and site: " + ", ".join(map(str, write_sn_report(out, results))))
    if any(uses_uxnet(r["model"]) for r in runs):
        print("UXNet architectures found: " + ", ".join(map(str, write_arch_report(out, results))))
    if any("holdout" in r for r in runs):
        from .report import holdout_table

        print("\nheld-out site, by adaptation option:\n" + holdout_table(results))
