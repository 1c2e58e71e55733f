"""Simulations on a Ray cluster that already runs, and despite a stale cluster address on the machine.

A Ray head is started on 127.0.0.1 as a separate process (``ray start --head
--block``), a small simulation runs on it with ``--ray-address`` and gives the same
per-site Dice as the same simulation on a local instance; the head is stopped by
its own process id. Then a cluster address left in Ray's temp folder by a head that
no longer runs must not stop a plain ``fedsite simulate``: it starts its own instance.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.deploy.harness import free_port, kill_tree
from tests.helpers import TINY_EXPERIMENT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


@pytest.fixture
def ray_tmp():
    """A short temp folder of Ray's own (its socket paths must stay under 107 characters)."""
    path = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _simulate(tmp_path, out, *flags, env=None):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_EXPERIMENT)
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config), "--out", str(out), *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env={**os.environ, **ENV, **(env or {})})


def _per_site(out):
    return {r["method"]: r["per_site"] for r in json.loads((out / "results.json").read_text())["runs"]}


def _start_head(ray_tmp, log):
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = free_port()
    cmd = [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
           "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(ray_tmp)]
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **ENV})
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in Path(log.name).read_text(errors="replace"):
        if head.poll() is not None or time.monotonic() > deadline:
            kill_tree(head.pid)
            raise AssertionError("the Ray head did not start:\n" + Path(log.name).read_text(errors="replace")[-3000:])
        time.sleep(0.5)
    return head, f"127.0.0.1:{port}"


def test_a_simulation_on_a_running_ray_cluster_matches_a_local_one(tmp_path, ray_tmp):
    with open(tmp_path / "head.log", "w") as log:
        head, address = _start_head(ray_tmp, log)
        try:
            done = _simulate(tmp_path, tmp_path / "cluster", "--ray-address", address)
        finally:
            kill_tree(head.pid)
            head.wait(30)
    assert done.returncode == 0, done.stderr[-3000:]
    port = address.rsplit(":", 1)[1]
    assert re.search(rf"Connecting to existing Ray cluster at address: [\d.]+:{port}\b", done.stdout + done.stderr)
    local = _simulate(tmp_path, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    assert _per_site(tmp_path / "cluster") == _per_site(tmp_path / "local")


def test_a_stale_cluster_address_on_the_machine_does_not_stop_a_simulation(tmp_path, ray_tmp):
    dead = free_port()  # nothing listens there
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead}")
    done = _simulate(tmp_path, tmp_path / "out", env={"RAY_TMPDIR": str(ray_tmp)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "results.json").exists()
