"""``/metrics`` (Prometheus text format) and ``/health`` (JSON) for the daemons.

The server and each site daemon expose the same two routes; prometheus-client
renders the registry, the caller decides what "healthy" means.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def serve(host: str, port: int, registry: CollectorRegistry, health: Callable[[], tuple[bool, dict[str, Any]]],
          name: str = "fedsite-metrics") -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/health`` (200 when healthy, else 503) on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            route = self.path.split("?")[0]
            if route == "/metrics":
                body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
            elif route in ("/health", "/healthz"):
                ok, detail = health()
                body, ctype, code = json.dumps(detail).encode(), "application/json", 200 if ok else 503
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # scrapes are not news
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server
