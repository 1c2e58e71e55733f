"""Model registry: a name -> (typed config, builder). ``build_model`` is the only door."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


class ModelRegistryError(ValueError):
    """A model name is unknown or registered twice."""


@dataclass(frozen=True)
class ModelEntry:
    """How to build one registered model family from its typed config."""

    name: str
    config_cls: type
    builder: Callable[[Any], nn.Module]
    description: str


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, config_cls: type, description: str) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Decorator: register ``builder(config) -> nn.Module`` under ``name``."""

    def decorate(builder: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        if name in MODELS:
            raise ModelRegistryError(f"model {name!r} is already registered")
        MODELS[name] = ModelEntry(name, config_cls, builder, description)
        return builder

    return decorate


def model_names() -> list[str]:
    """All registered model names, sorted."""
    return sorted(MODELS)
