"""``parallel-cells``: independent federations of a matrix at the same time give the results of a sequential run."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from shared_models.config import ConfigError
from simulations.cell_pool import auto_parallel
from simulations.experiment import ExperimentConfig, Resources
from tests.helpers import TINY_EXPERIMENT

REPO = Path(__file__).resolve().parents[2]
TIMINGS = ("wall_s", "train_s", "aggregate_s", "evaluate_s", "site_train_s", "site_app_s", "start_s", "peak_memory_bytes", "command")  # what two runs of the same code may differ in


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _simulate(tmp_path, out, *flags):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_EXPERIMENT)
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config), "--seeds", "0,1", "--out", str(out), *flags]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=500, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_parallel_matrix_gives_the_results_of_a_sequential_one(tmp_path):
    log, parallel = _simulate(tmp_path, tmp_path / "parallel", "--parallel-cells", "2")
    assert "2 federations, 2 at a time" in log
    _, sequential = _simulate(tmp_path, tmp_path / "sequential")
    assert [r["seed"] for r in parallel["runs"]] == [0, 1]  # matrix order, whichever finished first
    assert _without_timings(parallel) == _without_timings(sequential)


def test_automatic_parallelism_fits_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cfg = ExperimentConfig(parallel_cells=0)
    assert auto_parallel(cfg, train_sites=4, cells=10) == 3  # 5 nodes (4 sites + a pooled node) at 1 core each
    assert auto_parallel(cfg, train_sites=4, cells=2) == 2
    assert auto_parallel(replace(cfg, client_resources=Resources(num_cpus=8)), train_sites=4, cells=10) == 1
    assert auto_parallel(replace(cfg, ray_address="127.0.0.1:6379"), train_sites=1, cells=10) == 1


def test_a_negative_parallel_cells_is_named():
    with pytest.raises(ConfigError, match="parallel-cells"):
        ExperimentConfig(parallel_cells=-1)
