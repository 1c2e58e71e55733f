"""The health/metrics HTTP endpoint section of a daemon's configuration (server and site alike)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError


@dataclass(frozen=True)
class EndpointSection:
    """Where a daemon serves ``/health`` and ``/metrics``; loopback unless the operator opens it."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = no endpoint

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: expected 0 (off) or 1..65535, got {self.port}")
