"""Real fedsite daemons (SuperLink/SuperNode processes) on 127.0.0.1, always cleaned up.

Every process a test starts goes through :class:`Processes`; its ``close()``
(a fixture finalizer) SIGKILLs each started process with every descendant
(snapshotted from /proc first: Flower starts its SuperExec in a new session,
so a process group alone does not cover the tree).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CORE_INSTALL = Path(__file__).resolve().parent / "core_install"  # Ray and matplotlib absent
ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FEDSITE_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (now)."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    for p in tree(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class Proc:
    def __init__(self, name: str, cmd: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None):
        self.name, self.log = name, log
        self._fh = open(log, "ab")  # noqa: SIM115
        self.popen = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **ENV, **(env or {})}, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def crash(self) -> None:
        """SIGKILL the whole tree at once (a power cut, not a shutdown)."""
        kill_tree(self.popen.pid)
        self.popen.wait(10)


DEPLOYED = (("client",), ("server",))  # the commands a hospital or the server host runs


def core_env() -> dict[str, str]:
    """A site or server process sees the core dependencies only (see core_install/sitecustomize.py)."""
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(CORE_INSTALL), str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


class Processes:
    def __init__(self, root: Path):
        self.root = root
        self.started: list[Proc] = []

    def start(self, name: str, *args: str) -> Proc:
        log = self.root / f"{name}.{sum(p.name == name for p in self.started)}.log"
        proc = Proc(name, [sys.executable, "-m", "simulations.cli", *args], log, REPO, core_env() if args[:1] in DEPLOYED else None)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            if proc.alive():
                kill_tree(proc.popen.pid)
        for proc in self.started:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
            proc._fh.close()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, procs: list[Proc] = (), poll: float = 0.5) -> Any:
    """Poll until ``predicate()`` is truthy; fail naming ``what`` (and the logs' tails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    tails = "\n".join(f"--- {p.name} ({p.log}) ---\n" + p.text()[-3000:] for p in procs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError):  # not listening (yet)
        return 0, ""


def make_federation(root: Path, sites: list[str], rogue: str | None, federation: dict[str, Any], heartbeat: float = 10.0) -> dict[str, Any]:
    """Provision a bundle on 127.0.0.1 with free ports; ``rogue`` gets a key the server does not know."""
    from server.provision import provision
    from simulations.domain_shift import DEFAULT_PROFILES, generate_dataset

    names = [*sites, *([rogue] if rogue else [])]
    profiles = [p for p in DEFAULT_PROFILES if p.name in sites]
    data = generate_dataset(root / "data", profiles=tuple(profiles), cases_per_site=6, size=(16, 16), num_classes=3)
    bundle = root / "bundle"
    provision(bundle, "127.0.0.1", names, port=free_port())
    server = yaml.safe_load((bundle / "server.yaml").read_text())
    if rogue:
        server["sites"].pop(rogue)  # provisioned by the same CA, never registered
    server["superlink"]["host"] = "127.0.0.1"  # the fleet proxy; the SuperLink itself binds 127.0.0.1
    server["superlink"]["internal-port"] = free_port()
    server["metrics"] = {"host": "127.0.0.1", "port": free_port()}
    server["federation"].update(federation)
    (bundle / "server.yaml").write_text(yaml.safe_dump(server, sort_keys=False))
    ports = {}
    for name in names:
        path = bundle / "sites" / f"{name}.yaml"
        site = yaml.safe_load(path.read_text())
        ports[name] = free_port()
        site.update({
            "data-dir": str(data / (name if name in sites else sites[0])),
            "state-dir": str(root / "state" / name),
            "health": {"host": "127.0.0.1", "port": ports[name]},
            "runtime-port": free_port(),
            "heartbeat-interval": heartbeat,
            "restart-delay": 2.0 if name != rogue else 20.0,
            "max-refusals": 2,
        })
        path.write_text(yaml.safe_dump(site, sort_keys=False))
    return {"bundle": bundle, "data": data, "server": server, "health_ports": ports, "work": bundle / "work"}


def federation_json(work: Path) -> dict[str, Any] | None:
    path = work / "federation" / "federation.json"
    return json.loads(path.read_text()) if path.exists() else None


def checkpoint_rounds(work: Path) -> list[int]:
    folder = work / "federation" / "checkpoints"
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("round-*.pt")) if folder.exists() else []
