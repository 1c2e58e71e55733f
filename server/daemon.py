"""``fedsite server --config server.yaml``: the central aggregation server.

What it does, in order:

1. starts Flower's ``flower-superlink`` (TLS with the provisioned certificate,
   ``--enable-supernode-auth``, ``--database <file>`` so registered sites and run
   history survive a restart, no runtime ``uv sync``: servers are often offline);
2. registers the provisioned sites' public keys through the Control API (the
   in-process equivalent of ``flwr supernode register KEY --name SITE``); a site
   whose key changed (``fedsite provision --rotate``) has its old key unregistered;
3. stops runs a crashed predecessor left running, builds the Flower App Bundle
   from a staged copy of the app (``pyproject.toml`` generated with this
   federation's run config + the ``shared_models``/``client``/``server``
   packages) and submits it (what ``flwr run APP CONNECTION`` does): the
   SuperLink starts our ServerApp, each SuperNode our ClientApp;
4. exports Prometheus metrics and ``/health`` while it waits for the run;
5. prints the per-site table, writes ``results.json`` (the schema of
   ``fedsite simulate``) in its work directory and exits 0, or keeps the
   SuperLink up with ``--stay-up``.

Restarted after a crash it resumes at the round after the last checkpoint: the
out-dir (``<work-dir>/federation``) and run name are stable, and the ServerApp
resumes from ``<out-dir>/checkpoints`` when run name, fingerprint and policy match.

The Control API calls use flwr 1.42's Python client (``flwr.cli.utils``), i.e.
the code behind the ``flwr`` CLI, pinned like ``simulations/engine.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

from shared_models.config import ConfigError, load_config  # noqa: E402
from shared_models.durable import atomic_write_text  # noqa: E402
from shared_models.executables import console_script, env_with_interpreter_bin  # noqa: E402

APP_PACKAGES = ("shared_models", "client", "server")
CONNECTION = "fedsite"


@dataclass(frozen=True)
class SuperLinkSection:
    certfile: str
    keyfile: str
    ca_certfile: str
    host: str = "0.0.0.0"
    port: int = 9092
    public_address: str = ""
    database: str = "state/superlink.db"
    health_port: int = 0  # Flower's gRPC health service (0 = off)


@dataclass(frozen=True)
class MetricsSection:
    host: str = "0.0.0.0"
    port: int = 9400  # 0 = no exporter


@dataclass(frozen=True)
class FederationSection:
    model: dict[str, Any]
    rounds: int = 20
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    policy: str = "fedbn"
    policy_overrides: dict[str, str] = field(default_factory=dict)
    loss: str = "dicece"
    local_epochs: int = 1
    lr: float = 3e-3
    batch_size: int = 8
    seed: int = 0
    intensity: str = "zscore"
    test_fraction: float = 0.25
    split_seed: int = 0
    device: str = "cpu"  # a site's own `device` (site.yaml) takes precedence
    min_sites: int = 0  # sites to wait for at the start (0 = every provisioned site)
    min_train_sites: int = 1  # quorum of valid updates per round
    wait_seconds: float = 600.0
    round_timeout: float = 3600.0
    straggler_grace: float = 300.0
    eval_every: int = 1


@dataclass(frozen=True)
class ServerConfig:
    superlink: SuperLinkSection
    sites: dict[str, str]  # site id -> OpenSSH public key file
    federation: FederationSection
    work_dir: str = "work"
    run_name: str = "fedsite"
    stay_up: bool = False
    metrics: MetricsSection = MetricsSection()


class DaemonError(RuntimeError):
    """The server cannot start or the run failed."""


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} fedsite server: {text}", flush=True)


def resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def run_config(cfg: ServerConfig, out_dir: Path) -> dict[str, Any]:
    """The ServerApp's run_config (keys of ``server.run_config.ServerRunConfig``)."""
    fed = cfg.federation
    return {
        "model": json.dumps(fed.model),
        "run-name": cfg.run_name,
        "out-dir": str(out_dir),
        "num-rounds": fed.rounds,
        "local-epochs": fed.local_epochs,
        "lr": fed.lr,
        "batch-size": fed.batch_size,
        "seed": fed.seed,
        "loss": fed.loss,
        "policy": fed.policy,
        "policy-overrides": json.dumps(fed.policy_overrides),
        "strategy": fed.strategy,
        "strategy-options": json.dumps(fed.strategy_options),
        "device": fed.device,
        "intensity": fed.intensity,
        "test-fraction": fed.test_fraction,
        "split-seed": fed.split_seed,
        "min-nodes": fed.min_sites or len(cfg.sites),
        "min-train-nodes": fed.min_train_sites,
        "wait-seconds": fed.wait_seconds,
        "round-timeout": fed.round_timeout,
        "straggler-grace": fed.straggler_grace,
        "eval-every": fed.eval_every,
        "resume": True,
    }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise DaemonError(f"run config value {value!r} cannot be written to TOML")
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def stage_app(dest: Path, config: dict[str, Any]) -> Path:
    """Write the Flower App (pyproject + packages) that ``flwr run`` would bundle."""
    import server as server_pkg

    src_root = Path(server_pkg.__file__).resolve().parent.parent
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for pkg in APP_PACKAGES:
        shutil.copytree(src_root / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    try:
        version = metadata.version("fedsite")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    lines = [
        "# Generated by `fedsite server`: the Flower App Bundle of this federation.",
        "[build-system]", 'requires = ["setuptools>=64"]', 'build-backend = "setuptools.build_meta"', "",
        "[project]", 'name = "fedsite"', f'version = "{version}"',
        "dependencies = []  # installed with fedsite at every site; no runtime installation", "",
        "[tool.flwr.app]", 'publisher = "fedsite"', "",
        "[tool.flwr.app.components]", 'serverapp = "server.app:app"', 'clientapp = "client.app:app"', "",
        "[tool.flwr.app.config]",
        *(f"{key} = {_toml_value(value)}" for key, value in config.items()),
        "",
    ]
    (dest / "pyproject.toml").write_text("\n".join(lines))
    return dest


class Control:
    """The SuperLink's Control API (what the ``flwr`` CLI calls), in-process."""

    def __init__(self, address: str, root_certificates: Path):
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        conn = SuperLinkConnection(name=CONNECTION, address=address, root_certificates=str(root_certificates))
        self.client = init_http_client_from_connection(conn)

    def close(self) -> None:
        self.client.close()

    def runs(self, run_id: int | None = None) -> dict[int, Any]:
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest

        res = self.client.ListRuns(ListRunsRequest(run_id=run_id) if run_id is not None else ListRunsRequest())
        return {int(k): run_from_proto(v) for k, v in res.run_dict.items()}

    def nodes(self) -> list[Any]:
        from flwr.proto.control_pb2 import ListNodesRequest

        return list(self.client.ListNodes(ListNodesRequest()).nodes_info)

    def register(self, public_key_file: Path, name: str) -> int:
        from flwr.cli.supernode.register import try_load_public_key
        from flwr.proto.control_pb2 import RegisterNodeRequest

        return int(self.client.RegisterNode(RegisterNodeRequest(public_key=try_load_public_key(public_key_file), name=name)).node_id)

    def unregister(self, node_id: int) -> None:
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        self.client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))

    def stop(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        self.client.StopRun(StopRunRequest(run_id=run_id))

    def start(self, app_dir: Path) -> int:
        from flwr.cli.build import build_fab_from_disk
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        fab_bytes = build_fab_from_disk(app_dir)
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        res = self.client.StartRun(StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto({}), federation="", app_spec=""))
        if not res.HasField("run_id"):
            raise DaemonError("the SuperLink did not start the run")
        return int(res.run_id)


def _public_pem(public_key_file: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(public_key_file.read_bytes())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def sync_sites(control: Control, sites: dict[str, Path]) -> dict[str, int]:
    """Register every provisioned key; unregister a rotated-out key and the keys of sites
    removed from server.yaml (only nodes this daemon named; manual registrations stay)."""
    def text(key: bytes | str) -> str:
        return (key.decode() if isinstance(key, bytes) else key).strip()

    registered = {text(n.public_key): n for n in control.nodes() if n.status != "unregistered"}
    ids = {}
    for site, key_file in sites.items():
        pem = _public_pem(key_file).strip()
        if pem in registered:
            ids[site] = int(registered[pem].node_id)
            continue
        for node in list(registered.values()):
            if node.name == site:
                _say(f"site {site}: key changed, unregistering its old key (node {node.node_id})")
                control.unregister(int(node.node_id))
        ids[site] = control.register(key_file, site)
        _say(f"site {site}: key registered (node {ids[site]})")
    for node in registered.values():
        if node.name and node.name not in sites and int(node.node_id) not in ids.values():
            _say(f"site {node.name}: no longer in server.yaml, unregistering its key (node {node.node_id})")
            control.unregister(int(node.node_id))
    return ids


class SuperLink:
    """The ``flower-superlink`` child process (own process group)."""

    def __init__(self, cfg: ServerConfig, base: Path, work: Path, env: dict[str, str]):
        link = cfg.superlink
        db = resolve(base, link.database)
        db.parent.mkdir(parents=True, exist_ok=True)
        self.address = f"{'127.0.0.1' if link.host in ('0.0.0.0', '::', '') else link.host}:{link.port}"
        self.ca = resolve(base, link.ca_certfile)
        cmd = [
            console_script("flower-superlink"),
            "--ssl-certfile", str(resolve(base, link.certfile)),
            "--ssl-keyfile", str(resolve(base, link.keyfile)),
            "--ssl-ca-certfile", str(self.ca),
            "--enable-supernode-auth",
            "--database", str(db),
            "--host", link.host,
            "--port", str(link.port),
            "--disable-runtime-dependency-installation",
        ]
        if link.health_port:
            cmd += ["--health-server-address", f"{link.host}:{link.health_port}"]
        self.log_path = work / "superlink.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        # Same process group as the daemon: a signal to the group (Ctrl-C, systemd, docker) reaches both.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def wait_until_up(link: SuperLink, timeout: float = 90.0) -> Control:
    """A Control API client once the SuperLink answers (bounded)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not link.alive():
            raise DaemonError(f"flower-superlink exited with code {link.proc.returncode}; see {link.log_path}")
        host, port = link.address.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            control = Control(link.address, link.ca)
            control.runs()
            return control
        except Exception as exc:  # not listening yet
            last = exc
            time.sleep(0.5)
    raise DaemonError(f"the SuperLink did not answer within {timeout:.0f} s ({last})")


def summarise(fed: dict[str, Any], cfg: ServerConfig, wall_s: float) -> dict[str, Any]:
    """``results.json`` in the schema of ``fedsite simulate`` (one run, one seed)."""
    sites = list(fed.get("sites") or sorted(fed.get("per_site", {})))
    per_site = {s: {"dice": v["dice"], "n_test": v.get("n_test", 0)} for s, v in fed.get("per_site", {}).items()}
    finite = [v["dice"] for v in per_site.values() if isinstance(v["dice"], (int, float)) and math.isfinite(v["dice"])]
    mean = sum(finite) / len(finite) if finite else float("nan")
    model = cfg.federation.model
    run = {
        "method": cfg.run_name,
        "federated_method": cfg.federation.policy,
        "model": model,
        "seed": cfg.federation.seed,
        "rounds": fed.get("rounds", cfg.federation.rounds),
        "per_site": per_site,
        "mean_dice": mean,
        "wall_s": wall_s,
        "bytes_sent": fed.get("bytes_sent", 0),
        "bytes_received": fed.get("bytes_received", 0),
        "history": fed.get("history", []),
        "resumed_from": fed.get("resumed_from", 0),
    }
    summary = {cfg.run_name: {"mean_dice": mean, "std": 0.0, "seeds": [cfg.federation.seed],
                              "per_site": {s: per_site.get(s, {}).get("dice", float("nan")) for s in sites}}}
    return {
        "experiment": cfg.run_name,
        "sites": sites,
        "num_classes": int(model.get("out-channels", model.get("out_channels", 0))),
        "runs": [run],
        "summary": summary,
        "wall_s": wall_s,
        "command": "fedsite " + " ".join(sys.argv[1:]),
    }


def site_table(results: dict[str, Any]) -> str:
    run = results["runs"][0]
    rows = ["| site | Dice | test cases |", "|---|---|---|"]
    for site in results["sites"]:
        v = run["per_site"].get(site, {})
        rows.append(f"| {site} | {v.get('dice', float('nan')):.3f} | {v.get('n_test', 0)} |")
    rows.append(f"| mean | {run['mean_dice']:.3f} | |")
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="server.yaml (from `fedsite provision`)")
    parser.add_argument("--stay-up", action="store_true", help="keep the SuperLink running after the federation")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(ServerConfig, args.config)
    except ConfigError as exc:
        print(f"fedsite server: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.stay_up:
        cfg = dataclasses.replace(cfg, stay_up=True)
    try:
        return serve(cfg, args.config.resolve().parent)
    except DaemonError as exc:
        print(f"fedsite server: {exc}", file=sys.stderr)
        return 1


def serve(cfg: ServerConfig, base: Path) -> int:
    from shared_models.exporter import serve as serve_http

    from .metrics import StatusCollector

    started = time.perf_counter()
    work = resolve(base, cfg.work_dir)
    out_dir = work / "federation"
    out_dir.mkdir(parents=True, exist_ok=True)
    site_keys = {site: resolve(base, key) for site, key in cfg.sites.items()}
    missing = [str(p) for p in site_keys.values() if not p.exists()]
    if missing:
        raise DaemonError(f"public key file(s) not found: {', '.join(missing)}")
    env = env_with_interpreter_bin({**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(work / "flwr-home"),
                                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
    os.environ["FLWR_HOME"] = env["FLWR_HOME"]
    link = SuperLink(cfg, base, work, env)
    state: dict[str, Any] = {"run_id": None, "status": "starting", "nodes": {}}

    def on_signal(signum: int, _frame: Any) -> None:
        _say(f"signal {signum}: stopping the SuperLink")
        link.stop()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    http = None
    try:
        if cfg.metrics.port:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry()
            registry.register(StatusCollector(out_dir / "status.json", link.alive))
            registry.register(_NodesCollector(state))
            http = serve_http(cfg.metrics.host, cfg.metrics.port, registry,
                              lambda: (link.alive(), {"superlink": link.alive(), "run_id": state["run_id"], "status": state["status"]}))
            _say(f"metrics on http://{cfg.metrics.host}:{cfg.metrics.port}/metrics")
        control = wait_until_up(link)
        _say(f"SuperLink up on {cfg.superlink.host}:{cfg.superlink.port} (TLS, SuperNode authentication, database {cfg.superlink.database})")
        sync_sites(control, site_keys)
        for run_id, r in control.runs().items():
            if r.status.status != "finished":
                _say(f"stopping run {run_id} left {r.status.status} by a previous server process")
                control.stop(run_id)
        app_dir = stage_app(work / "app", run_config(cfg, out_dir))
        (out_dir / "federation.json").unlink(missing_ok=True)
        run_id = control.start(app_dir)
        state["run_id"], state["status"] = run_id, "running"
        follow_run_log(link, run_id)
        _say(f"run {run_id} submitted: {cfg.federation.rounds} rounds, policy {cfg.federation.policy}, strategy {cfg.federation.strategy}, out-dir {out_dir}")
        status = _wait_for_run(control, link, run_id, state)
        state["status"] = f"{status.status}:{status.sub_status}"
        if status.sub_status != "completed":
            raise DaemonError(f"run {run_id} ended {status.status}:{status.sub_status} ({status.details}); see {link.log_path}")
        fed = json.loads((out_dir / "federation.json").read_text())
        results = summarise(fed, cfg, time.perf_counter() - started)
        atomic_write_text(work / "results.json", json.dumps(results, indent=2))
        print(site_table(results), flush=True)
        resumed = f", resumed at round {fed['resumed_from']}" if fed.get("resumed_from") else ""
        _say(f"done: {results['runs'][0]['rounds']} rounds{resumed}; results in {work / 'results.json'}")
        if cfg.stay_up:
            _say("staying up (--stay-up); stop with SIGTERM")
            while link.alive():
                _poll_nodes(control, state)
                time.sleep(5)
            raise DaemonError(f"the SuperLink exited with code {link.proc.returncode}")
        control.close()
        return 0
    finally:
        link.stop()
        if http is not None:
            http.shutdown()


def _poll_nodes(control: Control, state: dict[str, Any]) -> None:
    try:
        state["nodes"] = {n.name or str(n.node_id): n.status for n in control.nodes()}
    except Exception:  # metrics only
        pass


def _wait_for_run(control: Control, link: SuperLink, run_id: int, state: dict[str, Any], poll: float = 2.0) -> Any:
    """The run's final status; fails if the SuperLink dies meanwhile."""
    while True:
        if not link.alive():
            raise DaemonError(f"the SuperLink exited with code {link.proc.returncode} during run {run_id}; see {link.log_path}")
        try:
            status = control.runs(run_id)[run_id].status
        except Exception as exc:
            _say(f"run status unavailable ({exc.__class__.__name__}); retrying")
            time.sleep(poll)
            continue
        if status.status == "finished":
            return status
        _poll_nodes(control, state)
        time.sleep(poll)


def follow_run_log(link: SuperLink, run_id: int) -> None:
    """Echo the round loop's own log lines (the ServerApp's output goes to the
    SuperLink's run log, what ``flwr log RUN_ID`` shows), on a daemon thread."""

    def follow() -> None:
        from flwr.proto.control_pb2 import StreamLogsRequest

        try:
            control = Control(link.address, link.ca)
            for res in control.client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
                for line in res.log_output.splitlines():
                    if " fedsite." in line:
                        print(line, flush=True)
        except Exception:  # the log is a convenience; the run status decides
            pass

    threading.Thread(target=follow, name="fedsite-run-log", daemon=True).start()


class _NodesCollector:
    """``fedsite_server_site_online{site}`` from the SuperLink's node list."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("fedsite_server_site_online", "1 if the site's SuperNode is online at the SuperLink", labels=["site"])
        for site, status in sorted(self.state["nodes"].items()):
            g.add_metric([site], 1.0 if status == "online" else 0.0)
        yield g
