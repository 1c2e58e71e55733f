"""Ctrl-C or SIGTERM during ``fedsite simulate``, then the same command: the interrupted cell resumes and ends bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import TINY_EXPERIMENT

pytestmark = pytest.mark.slow

TINY = TINY_EXPERIMENT.replace("rounds: 2", "rounds: 4")


def _simulate(config, out, log):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config), "--out", str(out)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def _per_site(out):
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    return {site: v["dice"] for site, v in run["per_site"].items()}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_cell_resumes_to_the_uninterrupted_result(tmp_path, sig):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with open(tmp_path / "straight.log", "w") as log:
        assert _simulate(config, straight, log).wait(600) == 0

    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = _simulate(config, resumed, log)
        deadline = time.monotonic() + 600
        while "round 2/4" not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(sig)
        assert proc.wait(120) == 128 + sig
    assert "run the same command again to resume" in log_path.read_text()
    assert not (resumed / "results.json").exists()

    with open(tmp_path / "second.log", "w") as log:
        assert _simulate(config, resumed, log).wait(600) == 0
    assert "resuming after the round-" in (tmp_path / "second.log").read_text()
    assert _per_site(resumed) == _per_site(straight)
