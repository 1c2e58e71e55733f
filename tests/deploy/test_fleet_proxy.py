"""The server's public port forwards the Fleet API only (real processes on 127.0.0.1).

``fedsite server`` with two provisioned sites. An outsider who holds only the
federation's CA certificate calls the Control API's ``ListNodes`` and
``StartRun`` on the public port, both with flwr's own protobuf-over-HTTPS client
(what the ``flwr`` CLI uses) and with the generated gRPC ``ControlStub``: every
call is refused by the proxy (HTTP 403 / gRPC PERMISSION_DENIED) and its access
log shows none of them reached the SuperLink, while the same ``ListNodes`` on the
SuperLink's loopback port (the server host's own access) lists both sites. The
two sites' SuperNodes authenticate through the proxy and the federation
completes.
"""

import json

import grpc
import httpx
import pytest
from flwr.proto.control_pb2 import ListNodesRequest, StartRunRequest
from flwr.proto.control_pb2_grpc import ControlStub
from flwr.proto.fab_pb2 import Fab

from tests.deploy.harness import Processes, http_get, make_federation, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SITES = ["site-a", "site-b"]
MODEL = {"name": "unet", "spatial-dims": 2, "in-channels": 1, "out-channels": 3, "channels": [4, 8], "norm": "batch"}
OUTSIDER_FAB = Fab(hash_str="0" * 64, content=b"PK\x05\x06" + b"\x00" * 18)  # an empty zip: any app would do


@pytest.fixture
def procs(tmp_path):
    registry = Processes(tmp_path)
    yield registry
    registry.close()


def _http_control(address, ca, home, monkeypatch):
    """flwr 1.42's Control API client, as ``flwr ls``/``flwr run`` builds it."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    monkeypatch.setenv("FLWR_HOME", str(home))
    return init_http_client_from_connection(SuperLinkConnection(name="outsider", address=address, root_certificates=str(ca)))


def _http_refused(call):
    with pytest.raises(httpx.HTTPStatusError) as info:
        call()
    return info.value.response.status_code


def _grpc_refused(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _access_log(work):
    return (work / "fleet-proxy" / "access.log").read_text().splitlines()


def test_outsider_with_the_ca_cannot_use_the_control_api_and_the_federation_completes(tmp_path, procs, monkeypatch):
    fed = make_federation(tmp_path, SITES, None, {
        "rounds": 2, "eval_every": 2, "model": MODEL, "batch_size": 4, "min_sites": 2, "min_train_sites": 2,
        "wait_seconds": 240.0, "round_timeout": 300.0, "straggler_grace": -1.0,
    })
    bundle, work, link = fed["bundle"], fed["work"], fed["server"]["superlink"]
    public, internal = f"127.0.0.1:{link['port']}", f"127.0.0.1:{link['internal-port']}"
    ca = bundle / "sites" / "site-a" / "ca.crt"  # what every site (and anyone it leaked to) holds
    server = procs.start("server", "server", "--config", str(bundle / "server.yaml"))
    sites = [procs.start(s, "client", "--config", str(bundle / "sites" / f"{s}.yaml")) for s in SITES]
    everyone = [server, *sites]
    wait_for(lambda: all(http_get(f"http://127.0.0.1:{fed['health_ports'][s]}/health")[0] == 200 for s in SITES),
             180, "both sites connected through the proxy", everyone)
    assert f"Fleet HTTP API on {internal}" in (work / "superlink.log").read_text()

    outsider = _http_control(public, ca, tmp_path / "outsider-home", monkeypatch)
    assert _http_refused(lambda: outsider.ListNodes(ListNodesRequest())) == 403
    assert _http_refused(lambda: outsider.StartRun(StartRunRequest(fab=OUTSIDER_FAB))) == 403
    with grpc.secure_channel(public, grpc.ssl_channel_credentials(ca.read_bytes())) as channel:
        stub = ControlStub(channel)
        assert _grpc_refused(lambda: stub.ListNodes(ListNodesRequest(), timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
        assert _grpc_refused(lambda: stub.StartRun(StartRunRequest(fab=OUTSIDER_FAB), timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
    # on the server host the SuperLink answers the very same request: the refusal is the proxy's
    own = _http_control(internal, ca, tmp_path / "outsider-home", monkeypatch)
    assert len(own.ListNodes(ListNodesRequest()).nodes_info) == len(SITES)

    log = _access_log(work)
    for path in ("/v1/control/list-nodes", "/v1/control/start-run", "/flwr.proto.Control/ListNodes", "/flwr.proto.Control/StartRun"):
        hits = [line for line in log if f" {path} " in line]
        assert hits and all(line.endswith("upstream=-") for line in hits), (path, hits)
    fleet = [line for line in log if " /v1/fleet/" in line]
    assert any("/v1/fleet/activate-node" in line and f"upstream={internal}" in line and '" 200 ' in line for line in fleet), fleet[:5]

    wait_for(lambda: not server.alive(), 300, "the federation to finish through the proxy", everyone)
    assert server.popen.returncode == 0, server.text()[-4000:]
    results = json.loads((work / "results.json").read_text())
    assert results["runs"][0]["rounds"] == 2 and sorted(results["runs"][0]["per_site"]) == SITES
    assert not any("/v1/control/" in line and "upstream=-" not in line for line in _access_log(work))
