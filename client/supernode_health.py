"""Ask the SuperNode itself whether it serves: Flower's gRPC health service on loopback.

The site daemon starts each SuperNode with ``--health-server-address`` on a free
127.0.0.1 port and probes it for ``/health``, so "running" is the SuperNode's own
answer, not the daemon's guess from its process table. In flwr 1.42 that service
answers SERVING from the moment the SuperNode's servers are up, before it reaches
the SuperLink; whether it is *connected* still comes from the SuperNode's log
(its ``SuperNode ID`` line and connection retries), the only signal it gives.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = "SERVING"
UNREACHABLE = "UNREACHABLE"


def probe(address: str, timeout: float = 2.0) -> str:
    """The SuperNode's health status at ``address`` (``SERVING``, ``NOT_SERVING``, ...) or ``UNREACHABLE``."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return UNREACHABLE
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
