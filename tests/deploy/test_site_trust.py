"""A site is who its key says, and runs only the FAB it approved (real processes on 127.0.0.1).

``fedsite server --stay-up`` with two provisioned sites. site-b's daemon uses its
own key but its YAML says ``site-id: site-a``: the ServerApp refuses that node,
naming the node, the claimed site and the key's site, and federates with the
real site-a. Then, on the server host, a second run is started with the same app
but one file changed (its ClientApp module writes a file when imported): the FAB
hash differs from the one the sites approved at provisioning, so no site installs
or imports it, both reply an error, log the hash and list it under
``refused_fabs`` on ``/health``; no file of that code appears at any site.
"""

import json

import pytest
import yaml

from server.app_bundle import build_fab, stage_app
from server.control import Control
from server.server_config import ServerConfig, run_config
from shared_models.config import load_config
from tests.deploy.harness import Processes, federation_json, http_get, make_federation, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SITES = ["site-a", "site-b"]
MODEL = {"name": "unet", "spatial-dims": 2, "in-channels": 1, "out-channels": 3, "channels": [4, 8], "norm": "batch"}
PAYLOAD = "\nimport os as _os, pathlib as _pathlib\n_pathlib.Path(_os.environ['FLWR_HOME']).parent.joinpath('unapproved-code-ran').write_text('ran')\n"


@pytest.fixture
def procs(tmp_path):
    registry = Processes(tmp_path)
    yield registry
    registry.close()


def _health(fed, site):
    code, body = http_get(f"http://127.0.0.1:{fed['health_ports'][site]}/health")
    return json.loads(body) if body else {}


def _changed_fab(root):
    """The approved app with one file changed: a different FAB hash."""
    app = stage_app(root / "changed-app")
    with open(app / "client" / "app.py", "a") as fh:
        fh.write(PAYLOAD)
    return build_fab(app)


def test_a_borrowed_site_id_and_an_unapproved_fab_are_refused(tmp_path, procs, monkeypatch):
    # Prepare: site-b keeps its key but claims to be site-a
    fed = make_federation(tmp_path, SITES, None, {
        "rounds": 1, "eval_every": 1, "model": MODEL, "batch_size": 4, "min_sites": 2, "min_train_sites": 1,
        "wait_seconds": 240.0, "round_timeout": 300.0, "straggler_grace": -1.0,
    })
    bundle, work = fed["bundle"], fed["work"]
    impostor = yaml.safe_load((bundle / "sites" / "site-b.yaml").read_text())
    impostor["site-id"] = "site-a"
    (bundle / "sites" / "site-b.yaml").write_text(yaml.safe_dump(impostor, sort_keys=False))
    approved = impostor["approved-fabs"]
    server = procs.start("server", "server", "--config", str(bundle / "server.yaml"), "--stay-up")
    sites = {s: procs.start(s, "client", "--config", str(bundle / "sites" / f"{s}.yaml")) for s in SITES}
    everyone = [server, *sites.values()]

    # 1. the approved FAB runs; the node of site-b's key is refused as site-a and the run goes on with the real one
    wait_for(lambda: (work / "results.json").exists(), 300, "the federation to finish", everyone)
    node_b = _health(fed, "site-b")["node_id"]
    result = federation_json(work)
    assert result["sites"] == ["site-a"] and result["history"][0]["train_sites"] == ["site-a"]
    line = f"node {node_b} claims site site-a but its key is registered as site-b; refused"
    assert result["left_out"] == {f"node-{node_b}": line}
    wait_for(lambda: line in server.text(), 30, "the refusal in the server log", [server])
    assert json.loads((tmp_path / "state" / "site-a" / "site_metrics.json").read_text())["recent"]  # site-a's ClientApp trained
    assert _health(fed, "site-a")["refused_fabs"] == []
    assert _health(fed, "site-a")["supernode_health"] == "SERVING"  # the SuperNode's own health service answered

    # 2. a run with a changed FAB, started on the server host: no site installs or imports it
    fab, changed = _changed_fab(tmp_path)
    assert changed not in approved and len(approved) == 1
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "admin-home"))
    control = Control(f"127.0.0.1:{fed['server']['superlink']['internal-port']}", bundle / "server" / "ca.crt")
    cfg = load_config(ServerConfig, bundle / "server.yaml")
    run_id = control.start(fab, run_config(cfg, tmp_path / "changed-out"))
    for site in SITES:
        refused = wait_for(lambda: _health(fed, site).get("refused_fabs"), 120, f"{site} to refuse the changed FAB", everyone)
        assert [(r["sha256"], r["run_id"]) for r in refused] == [(changed, run_id)]
        assert f"refused FAB sha256 {changed} of run {run_id}" in sites[site].text()
    wait_for(lambda: control.runs(run_id)[run_id].status.status == "finished", 120, "the changed run to end", [server])
    control.close()
    for site in SITES:
        state = tmp_path / "state" / site
        assert not (state / "unapproved-code-ran").exists()
        installed = [p.name for p in (state / "flwr-home" / "apps").iterdir()] if (state / "flwr-home" / "apps").exists() else []
        assert not any(changed[:8] in name for name in installed), installed
    assert any(approved[0][:8] in p.name for p in (tmp_path / "state" / "site-a" / "flwr-home" / "apps").iterdir())
    assert all(p.alive() for p in everyone)
