"""Aggregation of the shared keys with Flower's strategies, dtype-preserving.

The strategies themselves are Flower's (``flwr.serverapp.strategy``); this module
chooses one by name, points it at exactly the nodes the round targets, and fixes
two behaviours of the stock implementations that matter here: integer buffers
(``num_batches_tracked``) come back as float64, and FedMedian/FedTrimmedAvg
consume (pop) the arrays of the replies they are given.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")


class StrategyConfigError(ValueError):
    """Unknown strategy name or bad strategy option."""


def make_strategy(name: str, num_nodes: int, options: dict[str, Any] | None = None) -> Strategy:
    """Flower strategy ``name`` that trains and evaluates exactly ``num_nodes`` nodes."""
    opts = dict(options or {})
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=num_nodes, min_evaluate_nodes=num_nodes, min_available_nodes=num_nodes)
    try:
        if name == "fedavg":
            return FedAvg(**common)
        if name == "fedprox":
            return FedProx(**common, proximal_mu=float(opts.pop("proximal_mu", 0.01)))
        if name == "fedadam":
            return FedAdam(**common, eta=float(opts.pop("eta", 1e-2)), eta_l=float(opts.pop("eta_l", 1e-2)), tau=float(opts.pop("tau", 1e-3)))
        if name == "fedmedian":
            return FedMedian(**common)
        if name == "fedtrimmedavg":
            return FedTrimmedAvg(**common, beta=float(opts.pop("beta", 0.2)))
        if name == "krum":
            return Krum(**common, num_malicious_nodes=int(opts.pop("num_malicious_nodes", 0)))
    finally:
        if opts:
            raise StrategyConfigError(f"strategy {name}: unknown options {sorted(opts)}")
    raise StrategyConfigError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})")


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
    strategy: Strategy, server_round: int, replies: list[Message], reference: ArrayRecord
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Run the strategy's aggregation on copies of ``replies``; keep dtypes/keys."""
    if not len(reference):
        # Nothing is shared (policy "local"): there is nothing to average.
        return reference, None
    arrays, metrics = strategy.aggregate_train(server_round, [copy.deepcopy(m) for m in replies])
    if arrays is None:
        return None, metrics
    return restore_dtypes(arrays, reference), metrics
