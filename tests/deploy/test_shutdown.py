"""SIGTERM to the daemons in the middle of a round leaves no process behind (real processes on 127.0.0.1).

The server daemon's SuperLink starts Flower's SuperExec in a session of its own and
that the ServerApp runner; the site daemon's task gate starts a ClientApp runner.
While the site trains, both daemons get SIGTERM (as from systemd or `kill`): each
exits, and every process that was below either of them has ended as well.
"""

import signal
import time
from pathlib import Path

import pytest

from tests.deploy.harness import Processes, make_federation, tree, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SITE = "site-a"
MODEL = {"name": "unet", "spatial-dims": 2, "in-channels": 1, "out-channels": 3, "channels": [4, 8], "norm": "batch"}


@pytest.fixture
def procs(tmp_path):
    registry = Processes(tmp_path)
    yield registry
    registry.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _start_time(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _below(pid: int) -> dict[int, tuple[int | None, str]]:
    return {p: (_start_time(p), _cmdline(p)) for p in tree(pid) if p != pid}


def _running(procs: dict[int, tuple[int | None, str]]) -> list[str]:
    return [cmd for pid, (start, cmd) in procs.items() if start is not None and _start_time(pid) == start]


def test_sigterm_mid_round_leaves_no_child_of_either_daemon(tmp_path, procs):
    fed = make_federation(tmp_path, [SITE], None, {
        "rounds": 3, "local_epochs": 400, "eval_every": 1, "model": MODEL, "batch_size": 2, "min_sites": 1,
        "min_train_sites": 1, "wait_seconds": 240.0, "round_timeout": 600.0, "straggler_grace": -1.0,
    })
    bundle = fed["bundle"]
    server = procs.start("server", "server", "--config", str(bundle / "server.yaml"))
    site = procs.start(SITE, "client", "--config", str(bundle / "sites" / f"{SITE}.yaml"))

    def training() -> bool:
        runners = [c for _, c in _below(site.popen.pid).values() if "fab_gate.py" in c]
        apps = [c for _, c in _below(server.popen.pid).values() if "flwr-serverapp" in c or "serverapp" in c]
        return bool(runners and apps)

    wait_for(training, 240, "the site's ClientApp runner and the server's ServerApp runner", [server, site])
    time.sleep(2)  # well inside the round's 400 local epochs
    below = {**_below(server.popen.pid), **_below(site.popen.pid)}
    assert any("superexec" in c for _, c in below.values()), below  # Flower's SuperExec: a session of its own
    for daemon in (server, site):
        daemon.popen.send_signal(signal.SIGTERM)
    for daemon in (server, site):
        wait_for(lambda d=daemon: d.popen.poll() is not None, 60, f"{daemon.name} to exit after SIGTERM", [server, site])
    wait_for(lambda: not _running(below), 3, "every child of both daemons to end", [server, site])
    assert not (fed["work"] / "results.json").exists()  # it was stopped mid-run, not finished
