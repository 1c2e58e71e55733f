"""Site-side training metrics: written by the ClientApp, exported by the site daemon.

Flower runs the ClientApp in a fresh process per message, so the long-lived
``fedsite client`` daemon (what Prometheus scrapes) cannot observe training
directly. After each local training the ClientApp atomically writes
``<state-dir>/site_metrics.json``; the daemon turns it into metrics at scrape
time. Values stay at the site's own endpoint: nothing here enters a Flower
message.

Series (prefix ``fedsite_site_``): ``train_seconds``, ``train_samples``,
``images_per_second``, ``gpu_memory_bytes``, ``train_loss``, ``round``,
``trainings_total``, ``supernode_up``, ``supernode_restarts_total``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shared_models.durable import atomic_write_text

METRICS_FILE = "site_metrics.json"
RECENT = 20  # trainings kept in the file (round, which local state was loaded)
PREFIX = "fedsite_site_"


def record_training(state_dir: str | Path, site: str, entry: dict[str, Any]) -> None:
    """Atomically update the site's metrics file after a local training."""
    path = Path(state_dir) / METRICS_FILE
    previous = read_metrics(path) or {}
    recent = [*previous.get("recent", []), {k: entry.get(k) for k in ("run", "round", "local_state_checksum", "local_state_round")}][-RECENT:]
    data = {**previous, **entry, "site": site, "trainings": int(previous.get("trainings", 0)) + 1, "updated": time.time(), "recent": recent}
    atomic_write_text(path, json.dumps(data, indent=1))


def read_metrics(path: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class SiteCollector:
    """Prometheus collector over the site's metrics file and its SuperNode supervisor."""

    def __init__(self, site: str, state_dir: Path, supervisor: Callable[[], dict[str, Any]]):
        self.site, self.path, self.supervisor = site, Path(state_dir) / METRICS_FILE, supervisor

    def collect(self) -> Iterator[Metric]:
        sup = self.supervisor()
        labels = ["site"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric([self.site], float(value))
            return g

        yield gauge("supernode_up", "1 while the site's Flower SuperNode runs", 1.0 if sup.get("running") else 0.0)
        restarts = CounterMetricFamily(PREFIX + "supernode_restarts", "SuperNode restarts by the daemon", labels=labels)
        restarts.add_metric([self.site], float(sup.get("restarts", 0)))
        yield restarts
        m = read_metrics(self.path) or {}
        yield gauge("train_seconds", "seconds of the last local training", m.get("train_seconds", 0.0))
        yield gauge("train_samples", "samples processed in the last local training", m.get("samples", 0))
        yield gauge("images_per_second", "training throughput of the last local training", m.get("images_per_second", 0.0))
        yield gauge("gpu_memory_bytes", "peak GPU memory of the last local training (0 on CPU)", m.get("gpu_memory_bytes", 0))
        yield gauge("train_loss", "loss of the last local training", m.get("loss", float("nan")))
        yield gauge("round", "server round of the last local training", m.get("round", 0))
        trainings = CounterMetricFamily(PREFIX + "trainings", "local trainings completed", labels=labels)
        trainings.add_metric([self.site], float(m.get("trainings", 0)))
        yield trainings
