"""The ``flower-superlink`` child process of the server daemon, on 127.0.0.1 only.

Its one port serves the Fleet, Control and Runtime APIs; the sites reach the
Fleet API through :mod:`server.fleet_proxy`, the daemon the Control API here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from shared_models.executables import console_script
from shared_models.ports import free_loopback_port

from shared_models.child_process import start_child, stop_child
from .server_config import ServerConfig, resolve


class SuperLink:
    """The ``flower-superlink`` child process (own process group)."""

    def __init__(self, cfg: ServerConfig, base: Path, work: Path, env: dict[str, str]):
        link = cfg.superlink
        db = resolve(base, link.database)
        db.parent.mkdir(parents=True, exist_ok=True)
        self.port = link.internal_port or free_loopback_port()
        self.address = f"127.0.0.1:{self.port}"
        self.ca = resolve(base, link.ca_certfile)
        cmd = [
            console_script("flower-superlink"),
            "--ssl-certfile", str(resolve(base, link.certfile)),
            "--ssl-keyfile", str(resolve(base, link.keyfile)),
            "--ssl-ca-certfile", str(self.ca),
            "--enable-supernode-auth",
            "--database", str(db),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if link.health_port:
            cmd += ["--health-server-address", f"{link.host}:{link.health_port}"]
        self.log_path = work / "superlink.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        # A session of its own: the daemon stops it, then what it started (Flower's SuperExec and ServerApp runner).
        self.proc = start_child(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        stop_child(self.proc, timeout)
        self._log.close()
