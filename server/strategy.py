"""Aggregation of the shared keys with Flower's strategies, dtype-preserving.

The strategies themselves are Flower's (``flwr.serverapp.strategy``); this module
chooses one by name, points it at exactly the nodes the round targets, and fixes
two behaviours of the stock implementations that matter here: integer buffers
(``num_batches_tracked``) come back as float64, and FedMedian/FedTrimmedAvg
consume (pop) the arrays of the replies they are given.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from shared_models.protocol import ARRAYS


@dataclass(frozen=True)
class StrategyEntry:
    """A Flower strategy by name, with the options fedsite exposes and their defaults."""

    cls: type[Strategy]
    options: Mapping[str, Any] = field(default_factory=dict)  # option -> default (its type is the default's)
    description: str = ""


# What a server-side optimizer acts on: trainable parameters only. Statistics and
# counters are not parameters; a server Adam step on them would corrupt them.
SERVER_OPTIMIZERS: tuple[type[Strategy], ...] = (FedOpt, FedAvgM)

STRATEGY_REGISTRY: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry(FedAvg, {}, "example-weighted mean"),
    "fedprox": StrategyEntry(FedProx, {"proximal_mu": 0.01}, "FedAvg with a proximal term at the sites"),
    "fedadam": StrategyEntry(FedAdam, {"eta": 1e-2, "eta_l": 1e-2, "tau": 1e-3}, "server Adam on the parameters"),
    "fedyogi": StrategyEntry(FedYogi, {"eta": 1e-2, "eta_l": 0.0316, "tau": 1e-3}, "server Yogi on the parameters"),
    "fedadagrad": StrategyEntry(FedAdagrad, {"eta": 1e-1, "eta_l": 1e-1, "tau": 1e-9}, "server Adagrad on the parameters"),
    "fedavgm": StrategyEntry(FedAvgM, {"server_learning_rate": 1.0, "server_momentum": 0.9}, "server momentum on the parameters"),
    "fedmedian": StrategyEntry(FedMedian, {}, "coordinate-wise median"),
    "fedtrimmedavg": StrategyEntry(FedTrimmedAvg, {"beta": 0.2}, "trimmed mean"),
    "krum": StrategyEntry(Krum, {"num_malicious_nodes": 0}, "Krum (Byzantine-robust selection)"),
}
STRATEGIES = tuple(STRATEGY_REGISTRY)


class StrategyConfigError(ValueError):
    """Unknown strategy name or bad strategy option."""


def make_strategy(name: str, num_nodes: int, options: dict[str, Any] | None = None) -> Strategy:
    """Flower strategy ``name`` that trains and evaluates exactly ``num_nodes`` nodes."""
    if name not in STRATEGY_REGISTRY:
        raise StrategyConfigError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})")
    entry, opts = STRATEGY_REGISTRY[name], dict(options or {})
    unknown = sorted(set(opts) - set(entry.options))
    if unknown:
        raise StrategyConfigError(f"strategy {name}: unknown options {unknown} (known: {sorted(entry.options)})")
    try:
        values = {k: type(default)(opts.get(k, default)) for k, default in entry.options.items()}
    except (TypeError, ValueError) as exc:
        raise StrategyConfigError(f"strategy {name}: bad option value ({exc})") from exc
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=num_nodes, min_evaluate_nodes=num_nodes, min_available_nodes=num_nodes)
    return entry.cls(**common, **values)


class TargetedGrid:
    """A view of a Grid whose node list is fixed to the round's targets.

    Flower strategies sample from ``grid.get_node_ids()``; giving them this view
    lets us pick which sites train (e.g. only the pooled node) while the strategy
    still builds the messages (and FedProx/FedOpt record what they need).
    """

    def __init__(self, grid: Grid, node_ids: Iterable[int]):
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def restore_dtypes(aggregated: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Cast each aggregated array back to the dtype of the global model's array.

    Integer arrays are rounded first (an average of step counters is a count).
    """
    out = {}
    for key, ref in reference.items():
        value = aggregated[key].numpy()
        target = ref.numpy().dtype
        if np.issubdtype(target, np.integer):
            value = np.rint(value)
        # np.asarray: rint of a 0-d array is a numpy scalar; copy(order="C") keeps 0-d arrays 0-d
        out[key] = Array(np.asarray(value).astype(target).reshape(ref.numpy().shape).copy(order="C"))
    return ArrayRecord(out)


def aggregate_shared(
    strategy: Strategy, server_round: int, replies: list[Message], reference: ArrayRecord, parameter_keys: Iterable[str] | None = None
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Run the strategy's aggregation on copies of ``replies``; keep dtypes/keys.

    ``parameter_keys`` names the trainable parameters among the shared keys: a
    server optimizer (FedAdam, FedYogi, FedAdagrad, FedAvgM) steps on those only,
    and every other shared tensor (running statistics, counters) is the sites'
    example-weighted mean.
    """
    if not len(reference):
        # Nothing is shared (policy "local"): there is nothing to average.
        return reference, None
    params = None if parameter_keys is None else set(parameter_keys)
    statistics = [] if params is None else [k for k in reference if k not in params]
    if statistics and isinstance(strategy, SERVER_OPTIMIZERS):
        return _aggregate_parameters_and_statistics(strategy, server_round, replies, reference, statistics)
    arrays, metrics = strategy.aggregate_train(server_round, [copy.deepcopy(m) for m in replies])
    if arrays is None:
        return None, metrics
    return restore_dtypes(arrays, reference), metrics


def _aggregate_parameters_and_statistics(
    strategy: Strategy, server_round: int, replies: list[Message], reference: ArrayRecord, statistics: list[str]
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The server optimizer on ``reference``'s other keys, the example-weighted mean on ``statistics``."""
    skip = set(statistics)
    parameters = [k for k in reference if k not in skip]
    mean, metrics = FedAvg(weighted_by_key=strategy.weighted_by_key).aggregate_train(server_round, [_only(m, statistics) for m in replies])
    if mean is None:
        return None, metrics
    merged = dict(mean.items())
    if parameters:
        # The optimizer's "current" model is the global one, restricted to what it steps on.
        if isinstance(strategy, FedOpt):
            strategy.current_arrays = {k: reference[k].numpy() for k in parameters}
            _drop_moments(strategy, skip)
        else:
            strategy.current_arrays = ArrayRecord({k: reference[k] for k in parameters})
        stepped, metrics = strategy.aggregate_train(server_round, [_only(m, parameters) for m in replies])
        if stepped is None:
            return None, metrics
        merged.update(stepped.items())
    return restore_dtypes(ArrayRecord({k: merged[k] for k in reference}), reference), metrics


def _drop_moments(strategy: FedOpt, keys: set[str]) -> None:
    """Forget moments of tensors the optimizer no longer steps on (a checkpoint written before statistics were split off)."""
    for attr in ("m_t", "v_t"):
        moments = getattr(strategy, attr)
        if moments and keys & set(moments):
            setattr(strategy, attr, {k: v for k, v in moments.items() if k not in keys})


def _only(message: Message, keys: list[str]) -> Message:
    """A copy of ``message`` whose ArrayRecord holds only ``keys``."""
    message = copy.deepcopy(message)
    arrays = message.content[ARRAYS]
    message.content[ARRAYS] = ArrayRecord({k: arrays[k] for k in keys})
    return message
