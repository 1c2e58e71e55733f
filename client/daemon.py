"""``fedsite client --config site.yaml [--data DIR]``: the long-lived daemon of one site.

It supervises one Flower SuperNode (``python -m client.supernode``, i.e.
``flower-supernode`` with a configurable heartbeat) that connects to the
server with TLS (the federation CA in ``root-certificates``) and the site's
authentication key (``auth-private-key``, registered at the server by
``fedsite server``), and runs our ClientApp on this site's data. The node is
identified by its ``--node-config`` (a TOML file the daemon writes):
``site-id``, ``data-dir``, ``state-dir`` and ``device``.

- Site-local tensors live on disk under ``state-dir`` (``client/site_state.py``),
  so a restarted daemon trains on with byte-identical local state; Flower's
  in-memory ``Context.state`` is not used for them.
- Reconnection: the SuperNode retries a lost SuperLink itself (unbounded, with
  backoff); if it exits anyway the daemon starts it again after ``restart-delay``
  seconds, doubling up to 60 s. A key the server refuses ("Failed to activate
  SuperNode") is not a network fault: after ``max-refusals`` refused starts in a
  row the daemon exits with code 3 and one line saying so, for systemd or the
  operator to see (0 = retry forever, e.g. while the key is being registered).
- Ports: ``health.port`` and ``runtime-port`` are checked before anything starts;
  one taken is a one-line error naming the key.
- Only approved code runs: the SuperNode starts no ClientApp itself
  (``--isolation process``); the daemon's :class:`client.fab_gate.TaskGate` runs
  each task only if the sha256 of its FAB is in ``approved-fabs`` and refuses
  (error reply, log line, ``refused_fabs`` on ``/health``) any other.
- ``/health`` (200 when the SuperNode's own gRPC health service answers SERVING and
  its log reports it connected, else 503; ``client/supernode_health.py``) and
  ``/metrics`` (``client/site_metrics.py``) on ``health.host:health.port``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from shared_models.child_process import start_child, stop_child  # noqa: E402
from shared_models.config import ConfigError, load_config  # noqa: E402
from shared_models.durable import atomic_write_text  # noqa: E402
from shared_models.endpoint import EndpointSection  # noqa: E402
from shared_models.executables import env_with_interpreter_bin  # noqa: E402
from shared_models.json_logs import LOG_FORMATS, add_log_fields, use_log_format  # noqa: E402
from shared_models.ports import Listener, check_listeners, free_loopback_port  # noqa: E402

from .fab_gate import TaskGate, read_refusals  # noqa: E402
from .supernode_health import SERVING, UNREACHABLE, probe  # noqa: E402

DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")
FAB_HASH = re.compile(r"^[0-9a-f]{64}$")
NODE_ID = re.compile(r"SuperNode ID: (\d+)")
RECEIVING = re.compile(r"Receiving: (\w+) message")
LOST = re.compile(r"Connection attempt failed")
REGAINED = re.compile(r"Connection successful")
REFUSED = re.compile(r"Failed to activate SuperNode")
EXIT_KEY_REFUSED = 3


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    superlink: str  # host:port of the server
    root_certificates: str  # the federation CA (verifies the server)
    auth_private_key: str  # OpenSSH EC key; its public half is registered at the server
    data_dir: str
    state_dir: str
    device: str = "cpu"
    health: EndpointSection = EndpointSection(port=9500)
    runtime_port: int = 9094  # the SuperNode's local ClientApp API (127.0.0.1)
    heartbeat_interval: float = 30.0
    restart_delay: float = 5.0
    approved_fabs: tuple[str, ...] = ()  # sha256 of each FAB this site runs (none: no FAB runs)
    max_refusals: int = 5  # refused starts in a row before the daemon gives up (0 = never)

    def __post_init__(self) -> None:
        bad = [h for h in self.approved_fabs if not FAB_HASH.match(h)]
        if bad:
            raise ConfigError(f"approved-fabs: expected sha256 hex digests (64 lowercase hex characters), got {bad}")
        if not DEVICE.match(self.device):
            raise ConfigError(f"device: expected cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.max_refusals < 0:
            raise ConfigError(f"max-refusals: expected 0 (retry forever) or a positive count, got {self.max_refusals}")
        if not 10 <= self.heartbeat_interval <= 1800:
            raise ConfigError(f"heartbeat-interval: Flower's SuperLink accepts 10..1800 s, got {self.heartbeat_interval}")


def resolve_path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def check_data_dir(data_dir: Path) -> int:
    """Fail early, naming the folder, if the site's data is not where the config says."""
    for sub in ("images", "labels"):
        if not (data_dir / sub).is_dir():
            raise ConfigError(f"data-dir {data_dir}: no {sub}/ folder (expected {data_dir}/images and {data_dir}/labels)")
    n = sum(1 for p in (data_dir / "images").iterdir() if not p.name.startswith("."))
    if n == 0:
        raise ConfigError(f"data-dir {data_dir}: images/ is empty")
    return n


def check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device {device}: CUDA is not available on this machine")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device}: only {torch.cuda.device_count()} GPU(s) visible")


def write_node_config(path: Path, values: dict[str, str]) -> Path:
    """``--node-config`` as a TOML file (paths with spaces or quotes stay intact)."""
    atomic_write_text(path, "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


class Supervisor:
    """Runs the SuperNode, restarts it when it exits, and follows its log."""

    def __init__(self, cmd: list[str], env: dict[str, str], restart_delay: float, max_refusals: int = 0):
        self.cmd, self.env, self.restart_delay, self.max_refusals = cmd, env, restart_delay, max_refusals
        self.proc: subprocess.Popen[str] | None = None
        self.restarts = 0
        self.refusals = 0  # SuperNode starts in a row whose key the server refused
        self._refused = False  # the current SuperNode's activation was refused
        self.health_address = ""  # the current SuperNode's own gRPC health service (127.0.0.1)
        self.node_id: int | None = None
        self.connected = False
        self.last_message: dict[str, Any] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        """The SuperNode's state: its own health service's answer, and the connection its log reports."""
        with self._lock:
            running = self.proc is not None and self.proc.poll() is None
            snap = {"running": running, "connected": running and self.connected, "node_id": self.node_id,
                    "restarts": self.restarts, "last_message": dict(self.last_message), "pid": self.proc.pid if running else None}
            address = self.health_address
        snap["supernode_health"] = probe(address) if running and address else UNREACHABLE
        snap["connected"] = snap["connected"] and snap["supernode_health"] == SERVING
        return snap

    def _follow(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if m := NODE_ID.search(line):
                with self._lock:
                    self.node_id, self.connected = int(m.group(1)), True
            elif REFUSED.search(line):
                with self._lock:
                    self._refused = True
            elif m := RECEIVING.search(line):
                with self._lock:
                    self.last_message = {"type": m.group(1), "at": time.time()}
            elif LOST.search(line) or REGAINED.search(line):
                with self._lock:
                    self.connected = bool(REGAINED.search(line))

    def run(self) -> int:
        """Supervise until stopped (0) or until the key was refused ``max_refusals`` times in a row (3)."""
        delay = self.restart_delay
        while not self._stop.is_set():
            with self._lock:
                self.connected, self._refused = False, False
                self.health_address = f"127.0.0.1:{free_loopback_port()}"
                cmd = [*self.cmd, "--health-server-address", self.health_address]
                self.proc = start_child(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            started = time.monotonic()
            follower = threading.Thread(target=self._follow, args=(self.proc,), daemon=True)
            follower.start()
            code = self.proc.wait()
            follower.join(timeout=5)
            if self._stop.is_set():
                break
            self.refusals = self.refusals + 1 if self._refused else 0
            if self.max_refusals and self.refusals >= self.max_refusals:
                print(f"fedsite client: the server refused this site's key {self.refusals} times in a row "
                      "(Failed to activate SuperNode); is its auth.pub registered in the server's server.yaml? exiting",
                      file=sys.stderr, flush=True)
                return EXIT_KEY_REFUSED
            delay = self.restart_delay if time.monotonic() - started > 120 else min(60.0, delay * 2 if self.restarts else delay)
            self.restarts += 1
            print(f"fedsite client: SuperNode exited with code {code}; restarting in {delay:.0f} s", flush=True)
            self._stop.wait(delay)
        return 0

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            proc = self.proc
        if proc is not None:
            stop_child(proc, 15)  # SIGTERM first: the SuperNode deactivates itself at the SuperLink


def serve_health(host: str, port: int, site: str, supervisor: Supervisor, state_dir: Path, approved: tuple[str, ...]) -> ThreadingHTTPServer:
    from prometheus_client import CollectorRegistry

    from shared_models.exporter import serve

    from .site_metrics import SiteCollector

    registry = CollectorRegistry()
    registry.register(SiteCollector(site, state_dir, supervisor.snapshot))

    def health() -> tuple[bool, dict[str, Any]]:
        snap = {"site": site, **supervisor.snapshot(), "approved_fabs": list(approved), "refused_fabs": read_refusals(state_dir)}
        return bool(snap["connected"]), snap

    return serve(host, port, registry, health, name="fedsite-health")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text (default) or json: one JSON object per line")
    parser.add_argument("--config", type=Path, required=True, help="site.yaml (from `fedsite provision`)")
    parser.add_argument("--data", type=Path, help="this site's data folder (images/, labels/); overrides data-dir")
    parser.add_argument("--device", help="cpu | cuda | cuda:N | auto; overrides the config")


def run(args: argparse.Namespace) -> int:
    use_log_format(args.log_format, "fedsite-client")
    try:
        cfg = load_config(SiteConfig, args.config)
        add_log_fields(site=cfg.site_id)
        base = args.config.resolve().parent
        data_dir = args.data.resolve() if args.data else resolve_path(base, cfg.data_dir)
        state_dir = resolve_path(base, cfg.state_dir)
        device = args.device or cfg.device
        if not DEVICE.match(device):
            raise ConfigError(f"--device: expected cpu, cuda, cuda:N or auto, got {device!r}")
        n_images = check_data_dir(data_dir)
        check_device(device)
        check_listeners([Listener("health.port", cfg.health.host, cfg.health.port),
                         Listener("runtime-port", "127.0.0.1", cfg.runtime_port)], str(args.config))
        for name, value in (("root-certificates", cfg.root_certificates), ("auth-private-key", cfg.auth_private_key)):
            if not resolve_path(base, value).is_file():
                raise ConfigError(f"{name}: {resolve_path(base, value)} not found")
    except ConfigError as exc:
        print(f"fedsite client: configuration error: {exc}", file=sys.stderr)
        return 2
    state_dir.mkdir(parents=True, exist_ok=True)
    node_config = write_node_config(state_dir / "node-config.toml", {
        "site-id": cfg.site_id, "data-dir": str(data_dir), "state-dir": str(state_dir), "device": device})
    cmd = [
        sys.executable, "-m", "client.supernode",
        "--superlink", cfg.superlink,
        "--root-certificates", str(resolve_path(base, cfg.root_certificates)),
        "--auth-supernode-private-key", str(resolve_path(base, cfg.auth_private_key)),
        "--node-config", str(node_config),
        "--port", str(cfg.runtime_port),
        "--isolation", "process",  # the TaskGate below runs the ClientApp, approved FABs only
    ]
    env = env_with_interpreter_bin({
        **os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FEDSITE_HEARTBEAT_INTERVAL": str(cfg.heartbeat_interval),
        "FEDSITE_PARENT_PID": str(os.getpid()), "FLWR_HOME": str(state_dir / "flwr-home")})
    supervisor = Supervisor(cmd, env, cfg.restart_delay, cfg.max_refusals)
    gate = TaskGate(f"127.0.0.1:{cfg.runtime_port}", cfg.approved_fabs, state_dir, cfg.site_id, env)
    threading.Thread(target=gate.run, name="fedsite-task-gate", daemon=True).start()

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"fedsite client: signal {signum}, stopping the SuperNode", flush=True)
        gate.stop()
        supervisor.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    http = serve_health(cfg.health.host, cfg.health.port, cfg.site_id, supervisor, state_dir, cfg.approved_fabs) if cfg.health.port else None
    print(f"fedsite client: site {cfg.site_id}, {n_images} images in {data_dir}, state in {state_dir}, device {device}; "
          f"connecting to {cfg.superlink} (TLS, key {cfg.auth_private_key}); "
          f"approved FABs: {', '.join(cfg.approved_fabs) or 'none (every run is refused)'}"
          + (f"; health on http://{cfg.health.host}:{cfg.health.port}/health" if http else ""), flush=True)
    code = supervisor.run()
    gate.stop()
    if http is not None:
        http.shutdown()
    return code
