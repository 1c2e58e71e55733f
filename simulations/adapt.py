"""``fedsite adapt``: a never-trained site's model from a finished simulation cell, three ways.

Input: a finished cell ``OUT/runs/<arm>-seed<k>`` (``federation.json``, the
server's ``checkpoints/round-NNNN.pt``, each training site's
``site-state/<site>/<run>/local_state.pt``) and the new site's images
(``SITE/images/<case>.nii.gz``; ``SITE/labels`` optional, used only for scoring).
The options are the site-side algorithms of :mod:`client.adapt`:

* ``average``: the global shared tensors of the last checkpoint plus the
  element-wise mean over the training sites of their site-local tensors;
* ``adabn``: ``average``, then BN-type running statistics re-estimated on the new
  site's images (Li et al., AdaBN);
* ``sn-batch-average``: ``average``, then every Switchable Norm layer's BN-branch
  statistics replaced by the batch average over the new images. Skipped (with a
  note) for a model without Switchable Norm; likewise ``adabn`` without BN-type layers.

Labels are never used to adapt: the statistics come from all images of the new
site (transductive), the Dice is computed on the labelled ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.data import DataError
from client.adapt import NewSite, adabn, average_tensors, load_new_site, sn_batch_average
from client.trainer import evaluate_dice
from shared_models import architecture_fingerprint, build_model, partition
from shared_models.build import model_config
from shared_models.durable import atomic_torch_save
from shared_models.partition import Split
from shared_models.protocol import FEDERATION_FILE as RESULT_FILE

from .cells import Cell

OPTIONS = ("average", "adabn", "sn-batch-average")


class AdaptError(RuntimeError):
    """The finished run cannot be used (missing/mismatched files; the message names them)."""


# ---------------------------------------------------------------- the finished federation


@dataclass
class FinishedRun:
    """What a finished cell holds for building a new site's model."""

    cell_dir: Path
    run_name: str
    policy: str
    round: int
    model_spec: dict[str, Any]
    seed: int
    fingerprint: str
    shared: dict[str, torch.Tensor]  # global shared tensors of the last checkpoint
    local: dict[str, dict[str, torch.Tensor]]  # training site -> its site-local tensors


def load_finished_run(
    cell_dir: str | Path, train_sites: Sequence[str], *, model_spec: Mapping[str, Any] | None = None, seed: int | None = None
) -> FinishedRun:
    """Read a finished cell through :class:`simulations.cells.Cell`; ``model_spec``/``seed`` override its run config."""
    cell = Cell(Path(cell_dir))
    try:
        config = cell.config
    except FileNotFoundError as exc:
        raise AdaptError(f"{exc} (is {cell_dir} a finished `fedsite simulate` cell, OUT/runs/<arm>-seed<k>?)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdaptError(f"{cell.path / RESULT_FILE}: unreadable federation result ({type(exc).__name__}: {exc})") from exc
    if not train_sites:
        raise AdaptError("no training sites given")
    spec = dict(model_spec) if model_spec is not None else cell.model_spec()
    seed = config.seed if seed is None else seed
    model = build_model(spec, seed=seed)
    fingerprint = architecture_fingerprint(model)
    split = partition(model, cell.policy)
    try:
        ckpt = cell.checkpoint(fingerprint)
    except (FileNotFoundError, RuntimeError) as exc:
        raise AdaptError(str(exc)) from exc
    local = {site: _site_local(cell, site, split, fingerprint) for site in train_sites} if split.local else {}
    return FinishedRun(cell.path, config.run_name, cell.policy.name, int(ckpt.round), spec, int(seed), fingerprint,
                       dict(ckpt.arrays), local)


def _site_local(cell: Cell, site: str, split: Split, fingerprint: str) -> dict[str, torch.Tensor]:
    store = cell.site_store(site)
    if not store.exists():
        root = store.path.parents[1]
        have = sorted(p.name for p in root.parent.iterdir()) if root.parent.is_dir() else []
        raise AdaptError(f"{store.path}: no site state for training site {site!r} (sites with state: {have})")
    try:
        return cell.local_tensors(site, split, fingerprint)
    except RuntimeError as exc:
        raise AdaptError(str(exc)) from exc


def average_model(run: FinishedRun) -> nn.Module:
    """Option ``average``: global shared tensors + mean of the training sites' local tensors."""
    model = build_model(run.model_spec, seed=run.seed)
    state = {**run.shared, **average_tensors([run.local[s] for s in sorted(run.local)])}
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise AdaptError(f"{run.cell_dir}: no tensor for {missing[:3]} (neither in the checkpoint nor in the site states)")
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------- public API


def adapt_models(
    run: FinishedRun, site: NewSite, options: Sequence[str] = OPTIONS, *, batch_size: int = 8, device: str = "cpu", sn_mode: str = "mean"
) -> dict[str, tuple[nn.Module | None, dict[str, Any]]]:
    """Option -> (model or None if not applicable, info) for the new site."""
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown adaptation option(s) {unknown} (known: {', '.join(OPTIONS)})")
    out: dict[str, tuple[nn.Module | None, dict[str, Any]]] = {}
    base = average_model(run)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for option in options:
        model = average_model(run)
        info: dict[str, Any] = {}
        if option == "adabn":
            keys = adabn(model, site.images, batch_size, device)
            if not keys:
                out[option] = (None, {"skipped": "the model has no BatchNorm-type layer with running statistics"})
                continue
            info["batches"] = math.ceil(len(site.images) / batch_size)
        elif option == "sn-batch-average":
            layers = sn_batch_average(model, site.images, batch_size, sn_mode, device)
            if not layers:
                out[option] = (None, {"skipped": "the model has no Switchable Norm layer with a BN branch"})
                continue
            info["batches"] = math.ceil(len(site.images) / batch_size)
            info["sn_layers"] = layers
        state = model.state_dict()
        info["changed_tensors"] = sum(not torch.equal(state[k].cpu(), base_state[k]) for k in base_state)
        out[option] = (model.eval(), info)
    return out


def adapt_and_score(
    cell_dir: str | Path,
    train_sites: Sequence[str],
    site_dir: str | Path,
    options: Sequence[str] = OPTIONS,
    *,
    model_spec: Mapping[str, Any] | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    intensity: str = "zscore",
    spatial_shape: Sequence[int] | None = None,
    sn_mode: str = "mean",
    save_dir: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Option -> {"dice", "n", ...}: Dice of each option's model on the new site's labelled cases.

    ``dice`` is None when the site has no labels (``n`` = 0) or the option does not
    apply to the model (then ``skipped`` says why). Also per-class Dice, the number
    of tensors that differ from ``average`` and the batches used.
    """
    run = load_finished_run(cell_dir, list(train_sites), model_spec=model_spec, seed=seed)
    site = load_new_site(site_dir, intensity=intensity, spatial_shape=spatial_shape)
    num_classes = int(model_config(run.model_spec).out_channels)
    results: dict[str, dict[str, Any]] = {}
    for option, (model, info) in adapt_models(run, site, options, batch_size=batch_size, device=device, sn_mode=sn_mode).items():
        entry: dict[str, Any] = {"dice": None, "n": len(site.labelled), "n_images": len(site.images), **info}
        if model is not None and site.labelled:
            report = evaluate_dice(model, site.label_images, site.labels, num_classes, device)
            entry["dice"] = report.dice
            entry["per_class"] = list(report.per_class)
        if model is not None and save_dir is not None:
            path = Path(save_dir) / f"{option}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"model": run.model_spec, "option": option, "run": run.run_name,
                               "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, path)
            entry["saved"] = str(path)
        results[option] = entry
    return results


# ---------------------------------------------------------------- CLI: fedsite adapt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="a finished cell: OUT/runs/<arm>-seed<k>")
    parser.add_argument("--train-sites", help="comma-separated training sites whose local state is averaged (default: the federation's sites)")
    parser.add_argument("--site-dir", type=Path, required=True, help="the new site: SITE/images/*.nii.gz (+ optional SITE/labels/ for scoring)")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, from: {', '.join(OPTIONS)}")
    parser.add_argument("--model", help="model spec as JSON (default: the cell's entry in OUT/results.json)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass when re-estimating statistics")
    parser.add_argument("--intensity", choices=("zscore", "none"), default="zscore", help="per-image intensity normalization (as in training)")
    parser.add_argument("--sn-mode", choices=("mean", "pooled"), default="mean", help="Switchable Norm batch average: mean of batch variances or pooled")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--save-dir", type=Path, help="write each option's state_dict to DIR/<option>.pt")
    parser.add_argument("--out", type=Path, help="write the scores as JSON to this file")


def run(args: argparse.Namespace) -> int:
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    try:
        spec = json.loads(args.model) if args.model else None
        if args.train_sites:
            train_sites = [s.strip() for s in args.train_sites.split(",") if s.strip()]
        else:
            train_sites = list(json.loads((args.run / RESULT_FILE).read_text()).get("sites", []))
        results = adapt_and_score(
            args.run, train_sites, args.site_dir, options, model_spec=spec, batch_size=args.batch_size, device=args.device,
            intensity=args.intensity, sn_mode=args.sn_mode, save_dir=args.save_dir,
        )
    except (AdaptError, DataError, ValueError, OSError) as exc:
        print(f"fedsite adapt: {exc}", file=sys.stderr)
        return 2
    print(f"fedsite adapt: {args.site_dir} from {args.run} (training sites {', '.join(train_sites)})")
    print(f"{'option':<18} {'Dice':>7} {'n':>4}  note")
    for option, r in results.items():
        dice = f"{r['dice']:.4f}" if r["dice"] is not None else "-"
        note = r.get("skipped") or (f"{r['changed_tensors']} tensors differ from average" if option != "average" else "")
        print(f"{option:<18} {dice:>7} {r['n']:>4}  {note}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"run": str(args.run), "train_sites": train_sites, "site_dir": str(args.site_dir), "options": results}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"scores: {args.out}")
    return 0
