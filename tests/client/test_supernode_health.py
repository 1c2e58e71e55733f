"""The site's /health asks the SuperNode's own health service (the one flower-supernode starts)."""

from flwr.supercore.grpc_health import run_health_server_grpc_no_tls

from client.supernode_health import SERVING, UNREACHABLE, probe
from shared_models.ports import free_loopback_port


def test_probe_reports_what_flowers_health_server_answers_and_unreachable_once_it_stops():
    address = f"127.0.0.1:{free_loopback_port()}"
    assert probe(address, timeout=0.5) == UNREACHABLE
    server = run_health_server_grpc_no_tls(address)
    try:
        assert probe(address) == SERVING
    finally:
        server.stop(grace=None).wait()
    assert probe(address, timeout=0.5) == UNREACHABLE
