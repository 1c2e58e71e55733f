"""Refuse to start when a configured listening port is taken, naming the YAML key.

A daemon that dies with ``OSError: Address already in use`` deep in a child's
traceback tells the operator nothing; this check runs before anything starts and
gives one line with the port, the address and the key of the file to change.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

from .config import ConfigError


@dataclass(frozen=True)
class Listener:
    """One port a daemon will listen on, and the configuration key that sets it."""

    key: str  # e.g. "health.port"
    host: str
    port: int


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as the servers themselves do: a port left in TIME_WAIT by a previous run counts as free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError:
            return False
    return True


def check_listeners(listeners: Iterable[Listener], where: str) -> None:
    """ConfigError naming the key when two keys share a port or a port is in use; port 0 is skipped."""
    seen: dict[int, str] = {}
    for item in listeners:
        if not item.port:
            continue
        if item.port in seen:
            raise ConfigError(f"{item.key}: port {item.port} is also {seen[item.port]}; give each its own port in {where}")
        seen[item.port] = item.key
        if not _bindable(item.host, item.port):
            raise ConfigError(f"{item.key}: port {item.port} on {item.host or '0.0.0.0'} is in use by another process; "
                              f"stop it or choose another port in {where}")


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 now, for a child that binds it a moment later (loopback-only services)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
