"""An experiment's unset network, lr and batch size, filled from its data's plan.

``ExperimentConfig.model``/``lr``/``batch_size`` are ``None`` (or, for the model,
a partial spec) where the experiment did not set them. For each dataset every
site folder is fingerprinted by the site-side function a deployed ClientApp
uses (:func:`client.fingerprint.site_fingerprint`), :func:`server.plan.make_plan`
turns the fingerprints into a plan, and :func:`plan_experiment` returns the
experiment with only the unset values taken from it: an explicit value always
wins. The plan is printed as one block and written to ``plan.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from server.plan import Plan, make_plan
from shared_models.durable import atomic_write_text
from shared_models.nets import MODELS
from shared_models.protocol import PLAN_FILE, SiteFingerprint

from .experiment import DataConfig, ExperimentConfig, load_experiment

PLANNED = "plan"
GIVEN = "set"


def base_experiment(config: Path | None, data_dir: Path | None) -> ExperimentConfig:
    """The experiment YAML, or the embedded demo. The demo's network, lr and batch size are
    sized for its own 48x48 synthetic data, so with ``--data`` and no YAML the plan sets them."""
    cfg = load_experiment(config)
    if config is None and data_dir is not None:
        cfg = replace(cfg, name=data_name(data_dir), model=None, lr=None, batch_size=None)
    return cfg


def data_name(data_dir: Path) -> str:
    """A report title that follows the data: the folder's name and its cases' dimensionality ("brats-3d")."""
    from client.case_files import discover_site
    from client.data import DataError, list_sites

    try:
        dims = next((d for d in (discover_site(data_dir / s).spatial_dims for s in list_sites(data_dir)) if d), 0)
    except DataError:
        dims = 0  # the data error is reported, naming the folder, when the dataset is prepared
    return f"{Path(data_dir).resolve().name}-{dims}d" if dims else Path(data_dir).resolve().name


def fingerprints(root: Path, sites: list[str], test_fraction: float) -> list[SiteFingerprint]:
    """Each site's fingerprint, computed on its own folder as the site itself would. A site without one
    usable case is left out of the plan with one line (the federation then leaves it out too)."""
    from client.data import DataError
    from client.fingerprint import site_fingerprint

    found = []
    for site in sites:
        try:
            found.append(site_fingerprint(root / site, test_fraction=test_fraction, site_id=site))
        except DataError as exc:
            print(f"fedsite simulate: site {site} left out of the plan: {exc}", file=sys.stderr)
    if not found:
        raise DataError(f"{root}: no site has a usable case")
    return found


def merge_model(given: dict[str, Any] | None, planned: dict[str, Any]) -> dict[str, Any]:
    """The given spec, its missing keys from the planned one. Another model than the planned
    one takes only the planned keys its config has (e.g. ``channels``, ``norm``)."""
    given = dict(given or {})
    name = given.get("name", planned["name"])
    if name == planned["name"]:
        return {**planned, **given}
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(MODELS[name].config_cls)} if name in MODELS else set()
    return {**{k: v for k, v in planned.items() if k in fields}, **given, "name": name}


def apply_plan(cfg: ExperimentConfig, plan: Plan) -> tuple[ExperimentConfig, dict[str, str]]:
    """The concrete experiment and, per planned value, whether it came from the plan or was set."""
    model = merge_model(cfg.model, plan.model_spec)
    sources = {f"model.{key}": GIVEN if key in (cfg.model or {}) else PLANNED for key in model}
    for key in ("lr", "batch_size", "patch_size", "target_spacing"):
        sources[key] = GIVEN if getattr(cfg, key) is not None else PLANNED
    resolved = replace(cfg, model=model, **{key: getattr(plan, key) for key in ("lr", "batch_size", "patch_size", "target_spacing")
                                             if getattr(cfg, key) is None})
    if cfg.lr is None and cfg.pooled_lr is None:  # a given lr holds for every arm, the pooled one too
        resolved = replace(resolved, pooled_lr=plan.pooled_lr)
    sources["pooled_lr"] = GIVEN if cfg.pooled_lr is not None or cfg.lr is not None else PLANNED
    return resolved, sources


def _shape(values) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def describe(plan: Plan, fps: list[SiteFingerprint], cfg: ExperimentConfig, sources: dict[str, str]) -> str:
    """The plan as one compact block; ``[set]`` marks a value the experiment gave explicitly."""
    def mark(key: str) -> str:
        return f" [{sources[key]}]"

    cases = sum(fp.num_cases for fp in fps)
    smallest = "x".join(str(min(fp.shape_min[a] for fp in fps)) for a in range(plan.spatial_dims))
    largest = "x".join(str(max(fp.shape_max[a] for fp in fps)) for a in range(plan.spatial_dims))
    model = cfg.model or {}
    return "\n".join([
        f"plan ({len(fps)} site fingerprints; [set] = given by the experiment, kept):",
        f"  data     {plan.spatial_dims}D, {cases} cases, median shape {_shape(plan.patch_shape)} "
        f"(min {smallest}, max {largest}), spacing {_shape(plan.spacing)}, classes {list(plan.classes)}",
        f"  network  {model.get('name')}{mark('model.name')} channels {model.get('channels')}"
        f"{mark('model.channels') if 'channels' in model else ''} norm {model.get('norm')}"
        f"{mark('model.norm') if 'norm' in model else ''}; planned: {plan.reasons['channels']}",
        f"  training {plan.optimizer} lr {cfg.lr:g}{mark('lr')}"
        + (f" (pooled {cfg.pooled_lr:g}{mark('pooled_lr')})" if cfg.pooled_lr is not None else "")
        + f", batch {cfg.batch_size}{mark('batch_size')}"
        f" (planned: {plan.reasons['batch_size']})",
        f"  inputs   " + (f"patches {_shape(cfg.patch_size)}{mark('patch_size')}, spacing "
                          f"{_shape(cfg.target_spacing) if cfg.target_spacing else 'native'}{mark('target_spacing')}"
                          if cfg.patch_size else f"whole images{mark('patch_size')}") + f" (planned: {plan.reasons['patch_size']})",
    ])


def plan_experiment(cfg: ExperimentConfig, data: DataConfig, root: Path, sites: list[str], out: Path) -> ExperimentConfig:
    """Plan one dataset, print the plan, write ``out/plan.json``; the experiment with its unset values filled."""
    fps = fingerprints(root, sites, data.test_fraction)
    plan = make_plan(fps, training_sites=[s for s in sites if s != cfg.holdout])
    resolved, sources = apply_plan(cfg, plan)
    print(describe(plan, fps, resolved, sources), flush=True)
    record = {
        "plan": plan.to_json(),
        "applied": {"model": resolved.model, "lr": resolved.lr, "pooled_lr": resolved.pooled_lr, "batch_size": resolved.batch_size,
                    "patch_size": list(resolved.patch_size or ()), "target_spacing": list(resolved.target_spacing or ())},
        "sources": sources,
        "fingerprints": [dataclasses.asdict(fp) for fp in fps],
    }
    atomic_write_text(out / PLAN_FILE, json.dumps(record, indent=2))
    return resolved
