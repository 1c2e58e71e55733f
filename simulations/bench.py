"""``fedsite bench``: what the federation costs over plain PyTorch, in one run.

1. Training-loop throughput: the ClientApp's loop (``client.trainer.train_local``)
   against a hand-written PyTorch loop, same model, data, batches and seed.
   Interleaved repetitions, median samples/s of each, ratio ours/plain.
2. Simulation overhead: a full FedBN federation on Flower's simulation engine
   against the same work done serially in one process and one thread (each round,
   each site: its epoch, the refresh of its site-local statistics, its scoring),
   ratio simulation/serial wall time (the engine's start-up is reported apart),
   and a profile: the seconds of each part of the simulation next to the serial
   loop's for the same work (the sites' own training loops apart from the phase).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.data import load_site
from client.optim_state import StoredOptimizer
from client.schedule import RoundPosition
from client.trainer import TrainSettings, evaluate_dice, resolve_device, to_batch_tensors, train_local
from shared_models import build_model
from shared_models.durable import atomic_write_text
from shared_models.losses import segmentation_loss

from .domain_shift import generate_dataset
from .site_profiles import site_profiles
from .reference import plain_epoch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--size", type=int, help="image side (default 64 in 2D, 48 in 3D)")
    parser.add_argument("--cases", type=int, help="training cases per site (default 64 in 2D; 3D: 20, memory also at 10x)")
    parser.add_argument("--3d", dest="three_d", action="store_true",
                        help="the 3D patch pipeline against a plain MONAI loop, and its memory at 1x and 10x the volumes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-simulation", action="store_true")


def plain_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, lr: float, seed: int, device: torch.device) -> float:
    """The reference: the loop anyone would write by hand. Returns samples/s."""
    model.to(device).train()
    loss_fn = segmentation_loss()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    plain_epoch(model, opt, loss_fn, x, y, batch_size, generator, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(x) / (time.perf_counter() - started)


def bench_trainer(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    device = resolve_device(args.device)
    spec = {"name": "unet", "channels": args.channels, "norm": "batch", "out-channels": 4}
    # the plain loop's work: one constant-rate Adam, no augmentation (what the loop costs, not the recipe)
    settings = TrainSettings(epochs=1, lr=1e-3, batch_size=args.batch_size, device=str(device), amp=False, channels_last=False,
                             schedule="constant", augment=False)
    ours, plain = [], []
    for rep in range(args.repeats + 1):  # first repetition warms up both
        m1, m2 = build_model(spec, seed=rep), build_model(spec, seed=rep)
        report = train_local(m1, x, y, settings, segmentation_loss())
        ours_rate = report.samples / report.seconds
        plain_rate = plain_loop(m2, x, y, args.batch_size, 1e-3, rep, device)
        if rep:
            ours.append(ours_rate)
            plain.append(plain_rate)
    return {
        "device": str(device),
        "trainer_samples_per_s": statistics.median(ours),
        "plain_samples_per_s": statistics.median(plain),
        "ratio": statistics.median(ours) / statistics.median(plain),
    }


def bench_simulation(args: argparse.Namespace, root: Path, sites: list[str]) -> dict[str, Any]:
    """The FedBN federation on Flower's engine against the same work serially; where each round's time went."""
    from .engine import run_simulated_federation
    from .experiment import Arm, Cell, ExperimentConfig
    from .run import run_config_for

    spec = {"name": "unet", "channels": list(args.channels), "norm": "batch", "spatial-dims": 2, "in-channels": 1, "out-channels": 4}
    cfg = ExperimentConfig(rounds=args.rounds, lr=TrainSettings().lr, batch_size=args.batch_size, device=args.device,
                           methods=("fedbn",), seeds=(0,))
    run_config = run_config_for(cfg, cfg.data, Cell("data", "fedbn", Arm("fedbn"), spec, 0), root, sites, args.out / "sim")
    started = time.perf_counter()
    fed = run_simulated_federation(run_config, len(sites), num_cpus=1.0)
    sim_wall = time.perf_counter() - started
    serial = serial_federation(args, root, sites, spec, cfg.lr)
    serverapp = fed["wall_s"]  # the ServerApp's own wall time excludes engine start-up
    return {
        "simulation_wall_s": sim_wall,
        "serverapp_wall_s": serverapp,
        "engine_startup_s": sim_wall - serverapp,
        "serial_wall_s": serial["wall_s"],
        "serial_phases_s": serial["phases_s"],
        "ratio": sim_wall / serial["wall_s"],
        "ratio_excluding_startup": serverapp / serial["wall_s"],
        "rounds": args.rounds,
        "sites": len(sites),
        "profile": round_profile(fed, sim_wall, serial, len(sites)),
    }


def serial_federation(args: argparse.Namespace, root: Path, sites: list[str], spec: dict[str, Any], lr: float) -> dict[str, Any]:
    """The simulation's work in one process and one thread, no Flower: every round, every site trains its
    epoch (same recipe, optimizer continued), re-estimates its site-local statistics and scores its test split."""
    from shared_models import partition
    from shared_models.partition import Policy

    from client.refresh import refresh_statistics

    torch.set_num_threads(1)
    data = {s: load_site(root / s, num_classes=4) for s in sites}
    tensors = {s: (to_batch_tensors(np.stack([c.image for c in d.train]), np.stack([c.label for c in d.train])),
                   to_batch_tensors(np.stack([c.image for c in d.test]), np.stack([c.label for c in d.test]))) for s, d in data.items()}
    models = {s: build_model(spec, seed=0) for s in sites}
    split = partition(models[sites[0]], Policy.parse("fedbn", {}))
    settings = TrainSettings(epochs=1, lr=lr, batch_size=args.batch_size, device=args.device)
    optimizers: dict[str, StoredOptimizer | None] = dict.fromkeys(sites)
    phases = {"train": 0.0, "refresh": 0.0, "evaluate": 0.0}
    started = time.perf_counter()
    for rnd in range(args.rounds):
        for s in sites:
            (x, y), (xt, yt) = tensors[s]
            t0 = time.perf_counter()
            report = train_local(models[s], x, y, settings, segmentation_loss(), position=RoundPosition(rnd + 1, args.rounds),
                                 optimizer_state=optimizers[s])
            optimizers[s] = StoredOptimizer(report.optimizer_state, rnd + 1, s)
            t1 = time.perf_counter()
            refresh_statistics(models[s], x, split, args.batch_size, torch.device(args.device))
            t2 = time.perf_counter()
            evaluate_dice(models[s], xt, yt, 4, args.device)
            t3 = time.perf_counter()
            phases["train"] += t1 - t0
            phases["refresh"] += t2 - t1
            phases["evaluate"] += t3 - t2
    return {"wall_s": time.perf_counter() - started, "phases_s": phases}


def round_profile(fed: dict[str, Any], sim_wall: float, serial: dict[str, Any], n_sites: int) -> list[dict[str, Any]]:
    """Where the simulation's wall time went, next to the serial loop's seconds for the same work."""
    history = fed["history"]
    train = sum(e.get("train_s", 0.0) for e in history)
    evaluate = sum(e.get("evaluate_s", 0.0) for e in history)
    aggregate = sum(e.get("aggregate_s", 0.0) for e in history)
    rest = fed["wall_s"] - train - evaluate - aggregate
    site_loops = sum(sum(e.get("site_train_s", {}).values()) for e in history)
    site_apps = sum(sum(e.get("site_app_s", {}).values()) for e in history)
    phases = serial["phases_s"]
    return [
        {"part": "engine start-up (Ray, actors)", "simulation_s": sim_wall - fed["wall_s"], "serial_s": 0.0},
        {"part": "training phase (send, train, reply)", "simulation_s": train, "serial_s": phases["train"]},
        {"part": "  the sites' ClientApp calls (sum over sites)", "simulation_s": site_apps, "serial_s": phases["train"]},
        {"part": "  of which their training loops", "simulation_s": site_loops, "serial_s": phases["train"]},
        {"part": "evaluation phase (statistics refresh, scoring)", "simulation_s": evaluate,
         "serial_s": phases["refresh"] + phases["evaluate"]},
        {"part": "aggregation", "simulation_s": aggregate, "serial_s": 0.0},
        {"part": "waiting for and asking the sites (start)", "simulation_s": fed.get("start_s", 0.0), "serial_s": 0.0},
        {"part": "checkpoints, status, between phases", "simulation_s": rest - fed.get("start_s", 0.0), "serial_s": 0.0},
    ]


def profile_table(profile: list[dict[str, Any]], rounds: int) -> str:
    lines = ["| part | simulation s | per round | serial s | per round |", "|---|---|---|---|---|"]
    for row in profile:
        sim, ser = row["simulation_s"], row["serial_s"]
        lines.append(f"| {row['part']} | {sim:.2f} | {sim / rounds:.3f} | {ser:.2f} | {ser / rounds:.3f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.three_d:
        from .bench_patches import run as run_3d

        args.cases, args.size = args.cases or 20, args.size or 48
        return run_3d(args)
    args.cases, args.size = args.cases or 64, args.size or 64
    profiles = site_profiles(args.sites)
    root = generate_dataset(args.out / "data", profiles=profiles, cases_per_site=args.cases, size=(args.size, args.size))
    sites = [p.name for p in profiles]
    site = load_site(root / sites[0], test_fraction=0.0 if args.cases > 1 else 0.25, num_classes=4)
    x, y = to_batch_tensors(np.stack([c.image for c in site.train]), np.stack([c.label for c in site.train]))
    torch.set_num_threads(1)
    results: dict[str, Any] = {"trainer": bench_trainer(args, x, y)}
    t = results["trainer"]
    print(f"training loop ({t['device']}): fedsite {t['trainer_samples_per_s']:.1f} samples/s, "
          f"plain PyTorch {t['plain_samples_per_s']:.1f} samples/s, ratio {t['ratio']:.3f}")
    if not args.skip_simulation:
        results["simulation"] = s = bench_simulation(args, root, sites)
        print(f"simulation: {s['simulation_wall_s']:.1f} s on Flower's engine ({s['engine_startup_s']:.1f} s engine start-up) "
              f"vs {s['serial_wall_s']:.1f} s serial in one process: ratio {s['ratio']:.2f} "
              f"({s['ratio_excluding_startup']:.2f} without start-up)")
        print(profile_table(s["profile"], s["rounds"]))
    atomic_write_text(args.out / "bench.json", json.dumps(results, indent=2))
    print(f"written: {args.out / 'bench.json'}")
    return 0
