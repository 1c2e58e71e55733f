"""Run one federation (our ServerApp + ClientApp) on Flower's simulation engine.

Flower's public ``run_simulation`` gives the ServerApp an empty run_config; the
deployment path (``flwr run``) gives it the app's config. To run *the same*
ServerApp unchanged, we start the engine through its internal entry point with
a ServerApp context that carries the run_config, exactly as ``flwr run`` would.
This is the one place that touches that internal API (pinned flwr 1.42.x).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # keep GPU visibility as configured

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.simulation.run_simulation import _run_simulation  # noqa: E402
from flwr.supercore.telemetry import EventType  # noqa: E402

from client.app import app as client_app  # noqa: E402
from shared_models.protocol import FEDERATION_FILE  # noqa: E402
from server.app import app as server_app  # noqa: E402

from . import interrupt  # noqa: E402


def quiet_flower(verbose: bool) -> None:
    """Flower logs every message at INFO; keep our own per-round progress only."""
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    fedsite = logging.getLogger("fedsite")
    fedsite.setLevel(logging.INFO)
    if not fedsite.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        fedsite.addHandler(handler)
        fedsite.propagate = False


def run_simulated_federation(
    run_config: dict[str, Any], num_nodes: int, num_cpus: float = 1.0, num_gpus: float = 0.0, verbose: bool = False,
    ray_address: str = "", ray_cpus: int | None = None,
) -> dict[str, Any]:
    """Run the ServerApp with ``run_config`` against ``num_nodes`` simulated sites.

    Each virtual site gets ``num_cpus``/``num_gpus`` of the machine, or of the
    Ray cluster at ``ray_address`` (Ray resources; a local instance holds
    ``ray_cpus`` cores, default all of them); returns the federation
    result the ServerApp wrote.
    """
    quiet_flower(verbose)
    os.environ["FEDSITE_THREADS"] = str(max(1, int(num_cpus)))
    backend_config = {
        "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "init_args": ray_init_args(ray_address, num_gpus > 0, ray_cpus),
    }
    start_ray(backend_config["init_args"])
    out_file = Path(run_config["out-dir"]) / FEDERATION_FILE
    out_file.unlink(missing_ok=True)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    _run_simulation(
        num_supernodes=num_nodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_config=backend_config,
        server_app_context=context,
        verbose_logging=verbose,
    )
    if not out_file.exists():
        raise RuntimeError(f"the federation did not finish (no {out_file}); see the log above")
    return json.loads(out_file.read_text())


def ray_init_args(address: str, want_gpus: bool, num_cpus: int | None = None) -> dict[str, Any]:
    """``ray.init`` arguments: join the cluster at ``address``, or start a local instance of our own.

    ``address="local"`` makes Ray start a new instance even when another cluster's
    address is recorded on this machine (a user's own, or one stopped without
    ``ray stop``); without it Ray would join that cluster and then refuse the
    ``num_cpus`` we give. A cluster's resources are its own: none are given.
    """
    if address:
        return {"address": address}
    return {"address": "local", "num_cpus": num_cpus or os.cpu_count() or 1, "num_gpus": _gpu_count() if want_gpus else 0,
            "include_dashboard": False}


def start_ray(init_args: dict[str, Any]) -> None:
    """Start Ray on the main thread, as Flower's backend would on its engine thread (same init arguments,
    ``PYTHONPATH`` for the workers), so that our SIGTERM/SIGINT handler can be put back after Ray's core
    worker installs its own: a stopped run then says how to resume and leaves no Ray process."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    interrupt.reassert()


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()
