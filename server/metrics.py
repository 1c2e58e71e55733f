"""Prometheus metrics of the aggregation server (prometheus-client, scraped, never pushed).

The round loop runs inside Flower's ServerApp process, which Flower starts per
run and which a server restart replaces; the long-lived ``fedsite server``
daemon is what Prometheus scrapes. So the round loop writes a small
``status.json`` next to its checkpoints after every round (atomically), and the
daemon's exporter turns the newest one into metrics at scrape time. Nothing is
sent anywhere: telemetry to third parties stays off.

Series (all prefixed ``fedsite_server_``): ``round``, ``rounds_configured``,
``participating_sites``, ``site_participating{site}``, ``rejected_sites``,
``rejected_updates_total{site}``, ``round_skipped``, ``aggregation_seconds``,
``bytes_sent_total``, ``bytes_received_total``, ``round_bytes_sent``,
``round_bytes_received``, ``site_train_loss{site}``, ``site_dice{site}``,
``status_age_seconds``, ``up``.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shared_models.durable import atomic_write_text
from shared_models.protocol import STATUS_FILE

PREFIX = "fedsite_server_"


def round_status(result: dict[str, Any], entry: dict[str, Any], num_rounds: int) -> dict[str, Any]:
    """What the exporter needs after a round (from the federation result and the round's entry)."""
    history = result.get("history", [])
    rejected_total = Counter(site for e in history for site in e.get("rejected", {}))
    dice: dict[str, float] = {}
    for e in history:
        dice.update(e.get("dice", {}))
    return {
        "run_name": result.get("run_name", ""),
        "round": entry["round"],
        "num_rounds": num_rounds,
        "sites": list(result.get("sites", [])),
        "participating": list(entry.get("train_sites", [])),
        "rejected": dict(entry.get("rejected", {})),
        "rejected_total": dict(rejected_total),
        "skipped": entry.get("skipped"),
        "aggregate_s": float(entry.get("aggregate_s", 0.0)),
        "bytes_sent_total": int(result.get("bytes_sent", 0)),
        "bytes_received_total": int(result.get("bytes_received", 0)),
        "round_bytes_sent": int(entry.get("bytes_sent", 0)),
        "round_bytes_received": int(entry.get("bytes_received", 0)),
        "train_loss": dict(entry.get("train_loss", {})),
        "dice": dice,
        "updated": time.time(),
    }


def write_status(out_dir: Path, status: dict[str, Any]) -> None:
    """Atomically replace ``<out_dir>/status.json``."""
    atomic_write_text(Path(out_dir) / STATUS_FILE, json.dumps(status, indent=1, allow_nan=True))


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _gauge(name: str, doc: str, value: float | None = None, labels: list[str] | None = None) -> GaugeMetricFamily:
    if labels:
        return GaugeMetricFamily(PREFIX + name, doc, labels=labels)
    return GaugeMetricFamily(PREFIX + name, doc, value=0.0 if value is None else value)


def status_metrics(status: dict[str, Any] | None, up: bool = True) -> Iterator[Metric]:
    """Metric families of one status dict (``None``: no round finished yet)."""
    yield _gauge("up", "1 while the SuperLink of this server is running", 1.0 if up else 0.0)
    if status is None:
        return
    sites = sorted(set(status.get("sites", [])) | set(status.get("rejected_total", {})) | set(status.get("participating", [])))
    yield _gauge("round", "last completed (checkpointed) round", status["round"])
    yield _gauge("rounds_configured", "rounds of the federation", status["num_rounds"])
    yield _gauge("participating_sites", "sites whose update entered the last aggregation", len(status["participating"]))
    part = _gauge("site_participating", "1 if the site's update entered the last aggregation", labels=["site"])
    for site in sites:
        part.add_metric([site], 1.0 if site in status["participating"] else 0.0)
    yield part
    yield _gauge("rejected_sites", "sites whose update the validation gate rejected in the last round", len(status["rejected"]))
    rejected = CounterMetricFamily(PREFIX + "rejected_updates", "updates rejected by the validation gate", labels=["site"])
    for site in sites:
        rejected.add_metric([site], float(status["rejected_total"].get(site, 0)))
    yield rejected
    yield _gauge("round_skipped", "1 if the last round left the global model unchanged (no quorum)", 1.0 if status.get("skipped") else 0.0)
    yield _gauge("aggregation_seconds", "seconds the last aggregation took", status["aggregate_s"])
    yield CounterMetricFamily(PREFIX + "bytes_sent", "model bytes sent to sites", value=status["bytes_sent_total"])
    yield CounterMetricFamily(PREFIX + "bytes_received", "model bytes received from sites", value=status["bytes_received_total"])
    yield _gauge("round_bytes_sent", "model bytes sent in the last round", status["round_bytes_sent"])
    yield _gauge("round_bytes_received", "model bytes received in the last round", status["round_bytes_received"])
    for key, name, doc in (("train_loss", "site_train_loss", "site's training loss in the last round"), ("dice", "site_dice", "site's last Dice (personalised model)")):
        family = _gauge(name, doc, labels=["site"])
        for site, value in sorted(status[key].items()):
            family.add_metric([site], float(value) if value is not None else math.nan)
        yield family
    yield _gauge("status_age_seconds", "seconds since the last round finished", max(0.0, time.time() - status["updated"]))


class StatusCollector:
    """A prometheus-client collector reading ``status.json`` at every scrape."""

    def __init__(self, status_path: Path, is_up: Callable[[], bool] = lambda: True):
        self.status_path = Path(status_path)
        self.is_up = is_up

    def collect(self) -> Iterator[Metric]:
        yield from status_metrics(read_status(self.status_path), self.is_up())


class NodesCollector:
    """``fedsite_server_site_online{site}`` from the SuperLink's node list."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("fedsite_server_site_online", "1 if the site's SuperNode is online at the SuperLink", labels=["site"])
        for site, status in sorted(self.state["nodes"].items()):
            g.add_metric([site], 1.0 if status == "online" else 0.0)
        yield g
