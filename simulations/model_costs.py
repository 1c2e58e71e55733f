"""Parameters and MACs of each arm's network, exactly as an experiment built it.

The spec is the run's own (``results.json``: the arm's model with the data's
spatial dims and channels filled in) with the arm's ``model-schedule`` applied up
to the last round, i.e. the network that was scored. A schedule never changes the
tensors (the server refuses one that does), so the parameter count is that of
every round. MACs are for one input of the experiment's image size
(:mod:`shared_models.complexity`); a UXNet supernet is counted with every
candidate operator, as it was trained.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from shared_models.build import build_model
from shared_models.complexity import count_macs, count_parameters

from .experiment import DataConfig, ExperimentConfig


def scheduled_spec(spec: dict[str, Any], schedule: dict[int, dict[str, Any]], rounds: int) -> dict[str, Any]:
    """``spec`` with every schedule entry that starts by round ``rounds`` applied in order."""
    out = dict(spec)
    for start in sorted(int(k) for k in schedule):
        if start <= rounds:
            out.update(schedule[start])
    return out


def input_size(data: DataConfig) -> tuple[int, ...] | None:
    """The spatial size of the generated images; None for a folder on disk (sizes vary by site)."""
    return None if data.dir else tuple((data.anatomy or data.synthetic).size)


@functools.lru_cache(maxsize=64)
def _measure(spec_json: str, size: tuple[int, ...]) -> tuple[int, int]:
    spec = json.loads(spec_json)
    model = build_model(spec, seed=0)
    return count_parameters(model), count_macs(model, (1, int(spec.get("in-channels", 1)), *size))


def spec_costs(spec: dict[str, Any], size: tuple[int, ...]) -> tuple[int, int]:
    """(parameters, MACs of one input of spatial ``size``) of the network ``spec`` builds."""
    return _measure(json.dumps(spec, sort_keys=True), tuple(size))


def arm_costs(cfg: ExperimentConfig, results: dict[str, Any]) -> dict[str, tuple[int, int] | None]:
    """Per row of ``results`` (arm label): (params, MACs) of its network; None where the size is unknown."""
    size = input_size(cfg.data) if len(cfg.all_datasets) == 1 else None
    schedules = {c.label: c.arm.model_schedule for c in cfg.cells()}
    costs: dict[str, tuple[int, int] | None] = {}
    for run in results["runs"]:
        label = run["method"]
        if label not in costs:
            spec = scheduled_spec(run["model"], schedules.get(label, {}), cfg.rounds)
            costs[label] = spec_costs(spec, size) if size else None
    return costs

