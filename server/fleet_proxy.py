"""The server's public port: an nginx TLS reverse proxy that forwards the Fleet API only.

flwr 1.42's open-source SuperLink serves its Fleet, Control and Runtime APIs
(protobuf over HTTPS, paths ``/v1/fleet/``, ``/v1/control/``, ``/v1/runtime/``)
on one host:port, and the Control API has no authentication: whoever reaches
that port with the CA certificate could list the nodes and start a run with
their own app. So the SuperLink binds 127.0.0.1 only and this proxy, a child
process of ``fedsite server``, terminates TLS on the public address with the
server certificate and forwards ``/v1/fleet/`` (what a SuperNode calls, with
its signed authentication headers) to the SuperLink. Every other path is
answered ``403`` (a gRPC call: ``grpc-status 7``, PERMISSION_DENIED) without
being forwarded; the access log records ``upstream=-`` for those.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shared_models.durable import atomic_write_text

from shared_models.child_process import start_child, stop_child
from .server_config import DaemonError

FLEET_PREFIX = "/v1/fleet/"
NGINX_FALLBACK = Path("/usr/sbin/nginx")
DENIED = "only the Fleet API is served on this port"


def find_nginx() -> str:
    """The nginx executable; a one-line error naming the package when it is missing."""
    found = shutil.which("nginx") or (str(NGINX_FALLBACK) if NGINX_FALLBACK.is_file() else None)
    if not found:
        raise DaemonError("nginx not found: install your distribution's nginx package (Debian/Ubuntu: apt-get install nginx-light)")
    return found


@dataclass(frozen=True)
class ProxySpec:
    """What the proxy listens on, where it forwards to, and with which TLS files."""

    host: str
    port: int
    internal_port: int
    certfile: Path
    keyfile: Path
    ca_certfile: Path


def listen_address(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        return str(port)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_config(spec: ProxySpec, prefix: Path) -> str:
    """nginx.conf: every path (pid, logs, temp files) under ``prefix``; no root needed."""
    temp = "\n".join(f"    {kind}_temp_path {prefix / 'tmp' / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# Written by `fedsite server` at every start; edits are overwritten.
worker_processes 1;
pid {prefix / 'nginx.pid'};
error_log {prefix / 'error.log'} notice;
events {{ worker_connections 1024; }}
http {{
    log_format fleet '$remote_addr [$time_iso8601] "$request" $status upstream=$upstream_addr';
    access_log {prefix / 'access.log'} fleet;
{temp}
    server_tokens off;
    map $http_content_type $fedsite_grpc {{ ~*^application/grpc 1; default 0; }}
    upstream superlink {{ server 127.0.0.1:{spec.internal_port}; keepalive 16; }}
    server {{
        listen {listen_address(spec.host, spec.port)} ssl http2;
        ssl_certificate {spec.certfile};
        ssl_certificate_key {spec.keyfile};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 0;
        location {FLEET_PREFIX} {{
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_ssl_trusted_certificate {spec.ca_certfile};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        location = /fedsite-denied-grpc {{
            internal;
            default_type application/grpc;
            add_header grpc-status 7 always;
            add_header grpc-message "{DENIED}" always;
            return 200 "";
        }}
        location / {{
            if ($fedsite_grpc) {{ rewrite ^ /fedsite-denied-grpc last; }}
            default_type application/json;
            return 403 '{{"detail": "{DENIED}"}}\\n';
        }}
    }}
}}
"""


class FleetProxy:
    """The nginx child process (``daemon off``, the daemon's process group, like the SuperLink)."""

    def __init__(self, spec: ProxySpec, work: Path):
        self.spec = spec
        self.prefix = work / "fleet-proxy"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        self.conf = self.prefix / "nginx.conf"
        atomic_write_text(self.conf, render_config(spec, self.prefix))
        self.access_log = self.prefix / "access.log"
        self.log_path = self.prefix / "nginx.out"
        nginx = find_nginx()
        cmd = [nginx, "-c", str(self.conf), "-p", str(self.prefix), "-e", str(self.prefix / "error.log"), "-g", "daemon off;"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        self.proc = start_child(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_listening(self, timeout: float = 20.0) -> None:
        """Bounded wait until the public port accepts connections; fails if nginx exits (bad config, port taken)."""
        host = "127.0.0.1" if self.spec.host in ("", "0.0.0.0", "::") else self.spec.host
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                tail = (self.prefix / "error.log").read_text(errors="replace")[-600:] if (self.prefix / "error.log").exists() else ""
                raise DaemonError(f"nginx (fleet proxy) exited with code {self.proc.returncode}: {tail.strip()}")
            try:
                socket.create_connection((host, self.spec.port), timeout=2).close()
                return
            except OSError:
                time.sleep(0.2)
        raise DaemonError(f"the fleet proxy did not listen on {host}:{self.spec.port} within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        stop_child(self.proc, timeout)  # SIGTERM: nginx's fast shutdown of master and workers
        self._log.close()
