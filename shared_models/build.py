"""``build_model(spec)``: the only constructor the apps call, plus the fingerprint.

A spec is a YAML-able dict ``{"name": <registered model>, **hyper-parameters}``.
The fingerprint identifies an architecture (state_dict keys, shapes, dtypes and
the module types that own them), so a site never loads tensors saved for a
different network and the server never averages replies of a different one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import ConfigError, from_dict, to_dict
from .nets import MODELS, model_names


def model_config(spec: Mapping[str, Any]) -> Any:
    """Validated, typed config for ``spec`` (errors name the ``model.<key>``)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"model: expected a mapping, got {type(spec).__name__}")
    if "name" not in spec:
        raise ConfigError(f"model.name: missing required key (registered: {', '.join(model_names())})")
    name = spec["name"]
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r} (registered: {', '.join(model_names())})")
    body = {k: v for k, v in spec.items() if k != "name"}
    return from_dict(MODELS[name].config_cls, body, path="model")


def normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec with every default filled in (what goes into messages and logs)."""
    return {"name": spec["name"], **to_dict(model_config(spec))}


def build_model(spec: Mapping[str, Any], seed: int | None = None) -> nn.Module:
    """Build the registered model described by ``spec``.

    With ``seed`` the initial weights are reproducible, so the server and every
    site start from identical tensors without shipping site-local ones.
    """
    cfg = model_config(spec)
    if seed is None:
        return MODELS[spec["name"]].builder(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[spec["name"]].builder(cfg)


def architecture_fingerprint(model: nn.Module) -> str:
    """SHA-256 over state_dict keys/shapes/dtypes and the module types in the net."""
    entries = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    types = [[name, type(m).__name__] for name, m in model.named_modules()]
    blob = json.dumps({"tensors": entries, "modules": types}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
