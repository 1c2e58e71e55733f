"""``fedsite server --config server.yaml``: the central aggregation server.

What it does, in order:

1. starts Flower's ``flower-superlink`` on 127.0.0.1 (TLS with the provisioned
   certificate, ``--enable-supernode-auth``, ``--database <file>`` so registered
   sites and run history survive a restart, no runtime ``uv sync``: servers are
   often offline), and on the public ``superlink.host:port`` an nginx proxy that
   forwards the Fleet API only (:mod:`server.fleet_proxy`): the SuperLink's
   unauthenticated Control API is reachable on the server host alone;
2. registers the provisioned sites' public keys through the Control API (the
   in-process equivalent of ``flwr supernode register KEY --name SITE``); a site
   whose key changed (``fedsite provision --rotate``) has its old key unregistered;
3. stops runs a crashed predecessor left running, builds the Flower App Bundle
   from a staged copy of the app (``pyproject.toml`` with the default run config
   + the ``shared_models``/``client``/``server`` packages: one hash per fedsite
   version, which the sites approve) and submits it with this federation's run
   config, the node id -> site map of the registered keys included, as the
   override (what ``flwr run APP CONNECTION --run-config`` does): the SuperLink
   starts our ServerApp, each SuperNode our ClientApp;
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
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

from shared_models.config import ConfigError, load_config  # noqa: E402
from shared_models.durable import atomic_write_text  # noqa: E402
from shared_models.executables import env_with_interpreter_bin  # noqa: E402
from shared_models.json_logs import LOG_FORMATS, add_log_fields, use_log_format  # noqa: E402
from shared_models.ports import Listener, check_listeners  # noqa: E402
from shared_models.protocol import FEDERATION_FILE, RESULTS_FILE, STATUS_FILE  # noqa: E402

from .app_bundle import build_fab, stage_app  # noqa: E402
from .control import follow_run_log, poll_nodes, wait_for_run, wait_until_up  # noqa: E402
from .server_config import DaemonError, ServerConfig, resolve, run_config, say  # noqa: E402
from .fleet_proxy import FleetProxy, ProxySpec, find_nginx  # noqa: E402
from .site_keys import sync_sites  # noqa: E402
from .summary import site_table, summarise  # noqa: E402
from .superlink import SuperLink  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text (default) or json: one JSON object per line")
    parser.add_argument("--config", type=Path, required=True, help="server.yaml (from `fedsite provision`)")
    parser.add_argument("--stay-up", action="store_true", help="keep the SuperLink running after the federation")
    parser.add_argument("--rounds", type=int, help="federated rounds; overrides federation.rounds (e.g. a short pilot)")


def check_ports(cfg: ServerConfig, where: str) -> None:
    """Every port the server will listen on is free, before anything starts (the key named if not)."""
    sl = cfg.superlink
    check_listeners([Listener("superlink.port", sl.host, sl.port),
                     Listener("superlink.internal-port", "127.0.0.1", sl.internal_port),
                     Listener("superlink.health-port", sl.host, sl.health_port),
                     Listener("metrics.port", cfg.metrics.host, cfg.metrics.port)], where)


def run(args: argparse.Namespace) -> int:
    use_log_format(args.log_format, "fedsite-server")
    try:
        cfg = load_config(ServerConfig, args.config)
        add_log_fields(run=cfg.run_name)
        if args.rounds is not None:
            if args.rounds < 1:
                raise ConfigError(f"--rounds: expected a positive number of rounds, got {args.rounds}")
            cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=args.rounds))
        check_ports(cfg, str(args.config))
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
    """Start the SuperLink, register the sites, run the federation, write its results."""
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
    find_nginx()  # before anything starts
    link = SuperLink(cfg, base, work, env)
    proxy: list[FleetProxy] = []
    state: dict[str, Any] = {"run_id": None, "status": "starting", "nodes": {}}

    def stop_all() -> None:
        for p in proxy:
            p.stop()
        link.stop()

    def on_signal(signum: int, _frame: Any) -> None:
        say(f"signal {signum}: stopping the fleet proxy and the SuperLink")
        stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    http = start_exporter(cfg, out_dir, link, state, lambda: bool(proxy) and proxy[0].alive())
    try:
        control = wait_until_up(link)
        proxy.append(start_proxy(cfg, base, work, link))
        say(f"SuperLink up on {link.address} (TLS, SuperNode authentication, database {cfg.superlink.database}); "
            f"Fleet API only on {cfg.superlink.host}:{cfg.superlink.port} (nginx, access log {proxy[0].access_log})")
        node_ids = sync_sites(control, site_keys)
        fed = federate(cfg, control, link, work, out_dir, state, node_ids)
        results = summarise(fed, cfg, time.perf_counter() - started)
        atomic_write_text(work / RESULTS_FILE, json.dumps(results, indent=2))
        print(site_table(results), flush=True)
        resumed = f", resumed at round {fed['resumed_from']}" if fed.get("resumed_from") else ""
        say(f"done: {results['runs'][0]['rounds']} rounds{resumed}; results in {work / RESULTS_FILE}")
        if cfg.stay_up:
            say("staying up (--stay-up); stop with SIGTERM")
            while link.alive() and proxy[0].alive():
                poll_nodes(control, state)
                time.sleep(5)
            raise DaemonError(f"the SuperLink ({link.proc.returncode}) or the fleet proxy ({proxy[0].proc.returncode}) exited")
        control.close()
        return 0
    finally:
        stop_all()
        if http is not None:
            http.shutdown()


def start_proxy(cfg: ServerConfig, base: Path, work: Path, link: SuperLink) -> FleetProxy:
    """The public Fleet-only proxy in front of the SuperLink, listening once this returns."""
    sl = cfg.superlink
    spec = ProxySpec(sl.host, sl.port, link.port, resolve(base, sl.certfile), resolve(base, sl.keyfile), link.ca)
    fleet = FleetProxy(spec, work)
    try:
        fleet.wait_listening()
    except DaemonError:
        fleet.stop()
        raise
    return fleet


def start_exporter(cfg: ServerConfig, out_dir: Path, link: SuperLink, state: dict[str, Any], proxy_alive: Callable[[], bool]) -> Any:
    """The Prometheus ``/metrics`` and ``/health`` endpoint (None when the port is 0)."""
    if not cfg.metrics.port:
        return None
    from prometheus_client import CollectorRegistry

    from shared_models.exporter import serve as serve_http

    from .metrics import NodesCollector, StatusCollector

    registry = CollectorRegistry()
    registry.register(StatusCollector(out_dir / STATUS_FILE, link.alive))
    registry.register(NodesCollector(state))
    http = serve_http(cfg.metrics.host, cfg.metrics.port, registry,
                      lambda: (link.alive() and proxy_alive(),
                               {"superlink": link.alive(), "fleet_proxy": proxy_alive(), "run_id": state["run_id"], "status": state["status"]}))
    say(f"metrics on http://{cfg.metrics.host}:{cfg.metrics.port}/metrics")
    return http


def federate(cfg: ServerConfig, control: Any, link: SuperLink, work: Path, out_dir: Path, state: dict[str, Any],
             node_ids: dict[str, int]) -> dict[str, Any]:
    """Stop runs a crashed predecessor left, submit this federation's app, wait; its ``federation.json``.
    ``node_ids`` (site -> node of its registered key) travels in the run config: identity is the key."""
    for run_id, r in control.runs().items():
        if r.status.status != "finished":
            say(f"stopping run {run_id} left {r.status.status} by a previous server process")
            control.stop(run_id)
    fab, digest = build_fab(stage_app(work / "app"))
    (out_dir / FEDERATION_FILE).unlink(missing_ok=True)
    run_id = control.start(fab, run_config(cfg, out_dir, node_ids))
    say(f"FAB sha256 {digest} (what each site's approved-fabs must list)")
    state["run_id"], state["status"] = run_id, "running"
    follow_run_log(link, run_id)
    say(f"run {run_id} submitted: {cfg.federation.rounds} rounds, policy {cfg.federation.policy}, strategy {cfg.federation.strategy}, out-dir {out_dir}")
    status = wait_for_run(control, link, run_id, state)
    state["status"] = f"{status.status}:{status.sub_status}"
    if status.sub_status != "completed":
        raise DaemonError(f"run {run_id} ended {status.status}:{status.sub_status} ({status.details}); see {link.log_path}")
    return json.loads((out_dir / FEDERATION_FILE).read_text())
