"""``fedsite models``: every registered model with its parameter and MAC counts.

Each model is built from its config defaults (``--channels`` overrides the widths
of models that have a ``channels`` field, so families compare at equal widths) and
measured on one input of ``--input-size``. Supernets (``uxnet``) are measured with
every candidate operator, i.e. as searched, not as discretised.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from shared_models.build import build_model, model_config
from shared_models.complexity import count_macs, count_parameters
from shared_models.nets import MODELS, model_names

DEFAULT_SIZE = {2: 64, 3: 32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-size", type=int, nargs="+", metavar="N", help="spatial input size (default 64 64 in 2D, 32 32 32 in 3D)")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2, help="2D or 3D variant of each model (default 2)")
    parser.add_argument("--channels", type=int, nargs="+", metavar="C", help="widths for models with a 'channels' field")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="only these registered models")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _spec(name: str, args: argparse.Namespace) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(MODELS[name].config_cls)}
    spec: dict[str, Any] = {"name": name}
    if "spatial_dims" in fields:
        spec["spatial_dims"] = args.spatial_dims
    elif args.spatial_dims != 2:
        raise ValueError("model has no spatial-dims option (2D only)")
    if args.channels and "channels" in fields:
        spec["channels"] = list(args.channels)
    return spec


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row: name, params, MACs at the input size, or the reason it could not be built."""
    size = list(args.input_size or [DEFAULT_SIZE[args.spatial_dims]] * args.spatial_dims)
    row: dict[str, Any] = {"name": name, "spatial_dims": args.spatial_dims, "input_size": size, "description": MODELS[name].description}
    try:
        if len(size) != args.spatial_dims:
            raise ValueError(f"--input-size needs {args.spatial_dims} numbers, got {len(size)}")
        spec = _spec(name, args)
        in_channels = getattr(model_config(spec), "in_channels", 1)
        model = build_model(spec, seed=0)
        row["params"] = count_parameters(model)
        row["macs"] = count_macs(model, (1, in_channels, *size))
    except Exception as exc:  # a row per model: one broken model must not hide the others
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    size = "x".join(str(s) for s in rows[0]["input_size"]) if rows else ""
    lines = [f"{'model':<18} {'params':>12} {'GMACs @' + size:>16}  description", "-" * 80]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<18} {'-':>12} {'-':>16}  n/a: {r['error']}")
        else:
            lines.append(f"{r['name']:<18} {r['params']:>12,} {r['macs'] / 1e9:>16.3f}  {r['description']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    names = args.models or model_names()
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)} (registered: {', '.join(model_names())})")
        return 2
    rows = [measure(n, args) for n in names]
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0
