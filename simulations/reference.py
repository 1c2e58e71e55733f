"""``fedsite reference``: fedsite's pooled training against the plain PyTorch loop anyone would write.

For each seed of a finished ``fedsite simulate`` run with the ``pooled`` method,
one process trains the same network (``build_model(spec, seed)``) on the union of
every site's training split (the very split fedsite used) with Adam, shuffled
batches and Dice + CE for rounds x local-epochs epochs -- no federation, no
schedule, no augmentation -- and scores it on every site's test split with
MONAI's ``DiceMetric``. The difference "fedsite pooled - plain" is paired over
(seed, site) cells with :mod:`.stats` (bootstrap interval, Wilcoxon test).
Writes ``reference.json`` and ``reference.md`` into the run folder.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

from client.data import load_site
from server.run_config import ServerRunConfig
from shared_models import build_model
from shared_models.durable import atomic_write_text
from shared_models.losses import segmentation_loss
from shared_models.protocol import RESULTS_FILE

from .cells import Cell
from .stats import cell_scores, compare

POOLED = "pooled"
PLAIN = "plain"
REFERENCE_FILE = "reference.json"
REFERENCE_MD = "reference.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="a finished `fedsite simulate` output folder with the pooled method")
    parser.add_argument("--device", help="cpu | cuda | cuda:N | auto (default: the device the run recorded)")
    parser.add_argument("--lr", type=float, help="the plain loop's Adam learning rate, e.g. a hand-written script's own 1e-3 "
                        "(default: the run's; written to reference-lr<LR>.json/.md)")


def plain_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
                batch_size: int, generator: torch.Generator, device: torch.device) -> float:
    """One epoch of the hand-written loop: shuffled index batches, forward, loss, backward, step. Mean loss."""
    total = torch.zeros((), device=device)
    for idx in torch.randperm(len(x), generator=generator).split(batch_size):
        xb, yb = x[idx].to(device), y[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)
    return float(total) / len(x)


@dataclass(frozen=True)
class PlainSettings:
    """What the plain loop takes from the run: nothing else."""

    lr: float
    batch_size: int
    epochs: int


def train_plain(spec: dict[str, Any], x: torch.Tensor, y: torch.Tensor, settings: PlainSettings, seed: int,
                device: torch.device) -> nn.Module:
    """The network fedsite built for ``seed``, trained by the plain loop; returned in eval mode."""
    torch.manual_seed(seed)
    model = build_model(spec, seed=seed).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    loss_fn = segmentation_loss()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.epochs):
        loss = plain_epoch(model, optimizer, loss_fn, x, y, settings.batch_size, generator, device)
        if not math.isfinite(loss):
            raise RuntimeError(f"plain loop diverged (seed {seed}, loss {loss})")
    return model.eval()


def dice_of_labels(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> float:
    """Mean foreground Dice of label maps (N, 1, *S): per class over cases holding it, then over classes."""
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    metric(one_hot(pred, num_classes), one_hot(true, num_classes))
    per_class = metric.aggregate()
    finite = per_class[torch.isfinite(per_class)]
    return float(finite.mean()) if len(finite) else float("nan")


@torch.no_grad()
def plain_dice(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, device: torch.device, batch_size: int = 16) -> float:
    pred = torch.cat([model(x[i : i + batch_size].to(device)).argmax(dim=1, keepdim=True).cpu() for i in range(0, len(x), batch_size)])
    return dice_of_labels(pred, y, num_classes)


@dataclass(frozen=True)
class SiteSplit:
    names: list[str]
    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class ReferenceData:
    """The union of every site's training split (one common shape) and each site's own test split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test: dict[str, SiteSplit]


def _stack(cases) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.stack([c.image for c in cases]).astype(np.float32)),
            torch.from_numpy(np.stack([c.label for c in cases]).astype(np.int64)))


def reference_data(cfg: ServerRunConfig, num_classes: int) -> ReferenceData:
    """The cell's splits as its sites loaded them (its test fraction, split seed and intensity)."""
    root, sites = Path(cfg.data_dir), cfg.site_list
    opts = dict(test_fraction=cfg.test_fraction, split_seed=cfg.split_seed, num_classes=num_classes, intensity=cfg.intensity)
    own = {s: load_site(root / s, **opts) for s in sites}
    shape = tuple(int(v) for v in np.max([d.spatial_shape for d in own.values()], axis=0))
    train = [c for s in sites for c in load_site(root / s, spatial_shape=shape, **opts).train]
    test = {s: SiteSplit([c.name for c in d.test], *_stack(d.test)) for s, d in own.items()}
    return ReferenceData(*_stack(train), test)


def resolve(name: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def reference_seed(cell: Cell, device: torch.device, lr: float | None = None) -> dict[str, Any]:
    """One seed: the plain loop on the cell's data (at the run's lr unless ``lr``), scored at every site."""
    cfg = cell.config
    if json.loads(cfg.model_schedule):
        raise ValueError(f"{cell.path}: a model schedule has no plain-loop equivalent")
    spec = cell.model_spec()
    num_classes = int(spec["out-channels"])
    data = reference_data(cfg, num_classes)
    started = time.perf_counter()
    settings = PlainSettings(lr or cfg.lr, cfg.batch_size, cfg.num_rounds * cfg.local_epochs)
    model = train_plain(spec, data.train_x, data.train_y, settings, cfg.seed, device)
    per_site = {s: {"dice": plain_dice(model, t.x, t.y, num_classes, device), "n_test": len(t.names), "test_cases": t.names}
                for s, t in data.test.items()}
    return {"method": PLAIN, "seed": cfg.seed, "n_train": len(data.train_x), "per_site": per_site,
            "mean_dice": statistics.fmean(v["dice"] for v in per_site.values()), "wall_s": time.perf_counter() - started}


def load_pooled(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, Cell]]:
    """results.json, its pooled rows and each seed's pooled cell; a one-line error naming ``run_dir`` otherwise."""
    file = run_dir / RESULTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{run_dir}: no {RESULTS_FILE} (not a finished `fedsite simulate` output folder)")
    results = json.loads(file.read_text())
    rows = [r for r in results["runs"] if r["method"] == POOLED]
    if not rows:
        methods = ", ".join(dict.fromkeys(r["method"] for r in results["runs"])) or "none"
        raise ValueError(f"{run_dir}: no {POOLED!r} method in {RESULTS_FILE} (methods: {methods}); "
                         f"run `fedsite simulate --methods {POOLED} ...` first")
    return results, rows, {int(r["seed"]): Cell(run_dir / "runs" / f"{POOLED}-seed{r['seed']}") for r in rows}


def check_split(row: dict[str, Any], plain: dict[str, Any], cell: Cell) -> None:
    """Every site's test split must be as large as the one fedsite scored."""
    for site, v in row["per_site"].items():
        if v.get("n_test") and v["n_test"] != plain["per_site"][site]["n_test"]:
            raise ValueError(f"{cell.path}: site {site} has {plain['per_site'][site]['n_test']} test cases here, "
                             f"fedsite scored {v['n_test']}")


def summarise(pooled: list[dict[str, Any]], plain: list[dict[str, Any]], sites: list[str]) -> dict[str, Any]:
    """Per site and overall: mean Dice of each, and the paired difference pooled - plain."""
    runs = pooled + plain

    def means(selected: list[str]) -> dict[str, Any]:
        a, b = cell_scores(runs, POOLED, selected), cell_scores(runs, PLAIN, selected)
        return {"fedsite_pooled": statistics.fmean(a.values()), "plain": statistics.fmean(b.values()),
                "difference": compare(runs, POOLED, PLAIN, selected)}

    return {"per_site": {s: means([s]) for s in sites}, "mean": means(sites)}


def _signed(v: float) -> str:
    return f"{v:+.4f}".replace("-", "\u2212")


def _diff(d: dict[str, Any] | None) -> str:
    if d is None:
        return "n/a"
    ci = d["ci95"]
    return _signed(d["diff"]) + (f" [{_signed(ci[0])}, {_signed(ci[1])}]" if ci else " (one seed: no interval)")


def table(reference: dict[str, Any]) -> str:
    """Per site: fedsite pooled, plain, and pooled - plain with its paired bootstrap 95% interval."""
    lines = ["| site | fedsite pooled | plain PyTorch | pooled \u2212 plain [95% CI] |", "|---|---|---|---|"]
    rows = {**reference["summary"]["per_site"], "**mean**": reference["summary"]["mean"]}
    for site, r in rows.items():
        lines.append(f"| {site} | {r['fedsite_pooled']:.4f} | {r['plain']:.4f} | {_diff(r['difference'])} |")
    return "\n".join(lines)


def markdown(reference: dict[str, Any]) -> str:
    s, d = reference["settings"], reference["summary"]["mean"]["difference"] or {}
    return "\n".join([
        "## fedsite pooled vs a plain PyTorch loop", "",
        f"Same network and initialisation, same splits; plain loop: Adam (lr {s['lr']}), batch {s['batch_size']}, "
        f"{s['epochs']} epochs ({s['rounds']} rounds x {s['local_epochs']} local epoch(s)), Dice + CE, one process. "
        f"Seeds {', '.join(map(str, s['seeds']))}; Dice: MONAI DiceMetric, mean foreground Dice on each site's test split. "
        f"Interval: paired percentile bootstrap over {d.get('n', 0)} (seed, site) cells; Wilcoxon p = {d.get('p', float('nan')):.3g}. "
        f"Code version {reference['code_version']} (run: {reference['run_code_version']}).", "",
        table(reference), "",
    ])


def build_reference(run_dir: Path, device_name: str | None, lr: float | None = None) -> dict[str, Any]:
    """Run the plain loop for every pooled seed of ``run_dir``; the content of reference.json."""
    from .cell_identity import code_version

    results, rows, cells = load_pooled(run_dir)
    plain = []
    for row in rows:
        cell = cells[int(row["seed"])]
        device = resolve(device_name or cell.config.device)
        print(f"plain loop, seed {row['seed']} ({device}) ...", flush=True)
        plain.append(reference_seed(cell, device, lr))
        check_split(row, plain[-1], cell)
        print(f"      mean Dice {plain[-1]['mean_dice']:.4f} (fedsite pooled {row['mean_dice']:.4f}, {plain[-1]['wall_s']:.1f} s)", flush=True)
    cfg = cells[int(rows[0]["seed"])].config
    settings = {"data_dir": cfg.data_dir, "sites": cfg.site_list, "model": cells[int(rows[0]["seed"])].model_spec(),
                "lr": lr or cfg.lr, "run_lr": cfg.lr, "batch_size": cfg.batch_size, "rounds": cfg.num_rounds, "local_epochs": cfg.local_epochs,
                "epochs": cfg.num_rounds * cfg.local_epochs, "seeds": [int(r["seed"]) for r in rows], "intensity": cfg.intensity,
                "test_fraction": cfg.test_fraction, "split_seeds": {str(p["seed"]): cells[p["seed"]].config.split_seed for p in plain},
                "optimizer": "adam", "loss": "dicece", "fedsite_loss": cfg.loss}
    sites = [s for s in results["sites"] if s in cfg.site_list]
    return {"run": str(run_dir), "code_version": code_version(), "run_code_version": results.get("code_version"),
            "settings": settings, "runs": plain, "summary": summarise(rows, plain, sites)}


def reference_files(run_dir: Path, lr: float | None) -> tuple[Path, Path]:
    """reference.json/.md at the run's lr; reference-lr<LR>.json/.md at another, so neither overwrites the other."""
    if lr is None:
        return run_dir / REFERENCE_FILE, run_dir / REFERENCE_MD
    return run_dir / f"reference-lr{lr:g}.json", run_dir / f"reference-lr{lr:g}.md"


def run(args: argparse.Namespace) -> int:
    try:
        reference = build_reference(args.run, args.device, args.lr)
    except (OSError, ValueError) as exc:
        print(f"fedsite reference: {exc}", file=sys.stderr)
        return 2
    json_file, md_file = reference_files(args.run, args.lr)
    atomic_write_text(json_file, json.dumps(reference, indent=2))
    atomic_write_text(md_file, markdown(reference))
    print()
    print(table(reference))
    if reference["code_version"] != reference["run_code_version"]:
        print(f"note: fedsite's code changed since the run ({reference['run_code_version']} -> {reference['code_version']})")
    print(f"\nwritten: {json_file}, {md_file}")
    return 0
