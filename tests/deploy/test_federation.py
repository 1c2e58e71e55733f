"""A real deployment on 127.0.0.1: `fedsite server` + three `fedsite client` daemons.

One federation, three rounds, with faults injected as in production:

1. TLS + SuperNode authentication: the three provisioned sites join; a fourth
   daemon whose key was provisioned by the same CA but never registered is
   refused and never receives a training message; after two refused starts
   its daemon exits with code 3 instead of retrying forever.
2. ``/metrics`` of the server and of a site parse with prometheus-client and
   carry the issue's series.
3. Site crash: SIGKILL of one site's whole process tree while it trains round 2;
   the round closes with the other two once Flower reports the node unavailable
   (heartbeat 10 s, patience 2), far below the 600 s round timeout.
4. Server crash: SIGKILL of the server tree right after the round-2 checkpoint;
   the killed site and the server are started again. The server resumes at
   round 3 from the round-2 checkpoint; the site rejoins with its site-local
   tensors byte-identical to what it had stored.
5. The run completes: ``results.json`` in the work directory, exit code 0, and
   ``fedsite predict`` segments with the site's personalised model.

Measured values are printed (run pytest with -s) and written to
``<tmp>/measurements.json``.
"""

import hashlib
import json
import time

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from shared_models.durable import tensors_checksum

from tests.deploy.harness import Processes, checkpoint_rounds, federation_json, http_get, make_federation, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SITES = ["site-a", "site-b", "site-c"]
VICTIM = "site-c"
ROUNDS = 3
MODEL = {"name": "unet", "spatial-dims": 2, "in-channels": 1, "out-channels": 3, "channels": [4, 8], "norm": "batch"}
SERVER_SERIES = {
    "fedsite_server_round", "fedsite_server_participating_sites", "fedsite_server_site_participating", "fedsite_server_rejected_sites",
    "fedsite_server_rejected_updates", "fedsite_server_aggregation_seconds", "fedsite_server_bytes_sent", "fedsite_server_bytes_received",
    "fedsite_server_site_train_loss", "fedsite_server_site_dice", "fedsite_server_up",
}
SITE_SERIES = {"fedsite_site_train_seconds", "fedsite_site_train_samples", "fedsite_site_images_per_second", "fedsite_site_gpu_memory_bytes"}


@pytest.fixture
def procs(tmp_path):
    registry = Processes(tmp_path)
    yield registry
    registry.close()


def _families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tls_auth_federation_survives_a_site_crash_and_a_server_crash(tmp_path, procs):
    # Prepare: bundle, data, configs (free ports, heartbeat 10 s: Flower's minimum)
    fed = make_federation(tmp_path, SITES, "rogue", {
        "rounds": ROUNDS, "eval_every": ROUNDS, "model": MODEL, "batch_size": 4, "min_sites": 3, "min_train_sites": 2,
        "wait_seconds": 240.0, "round_timeout": 600.0, "straggler_grace": -1.0,
    })
    bundle, work, m = fed["bundle"], fed["work"], {}
    site_cmd = {s: ("client", "--config", str(bundle / "sites" / f"{s}.yaml")) for s in [*SITES, "rogue"]}
    server = procs.start("server", "server", "--config", str(bundle / "server.yaml"))
    sites = {s: procs.start(s, *site_cmd[s]) for s in SITES}
    rogue = procs.start("rogue", *site_cmd["rogue"])
    everyone = [server, *sites.values(), rogue]
    health = {s: f"http://127.0.0.1:{fed['health_ports'][s]}" for s in [*SITES, "rogue"]}
    metrics_url = f"http://127.0.0.1:{fed['server']['metrics']['port']}/metrics"

    # 1. the provisioned sites connect over TLS with their keys; the rogue key is refused
    t0 = time.monotonic()
    wait_for(lambda: all(http_get(health[s] + "/health")[0] == 200 for s in SITES), 180, "three sites connected", everyone)
    m["seconds_until_three_sites_connected"] = round(time.monotonic() - t0, 1)
    wait_for(lambda: "Failed to activate SuperNode" in rogue.text(), 60, "the unregistered key to be refused", [rogue])
    assert http_get(health["rogue"] + "/health")[0] == 503
    # ... and after `max-refusals` (2) refused starts in a row its daemon gives up with exit code 3
    wait_for(lambda: rogue.popen.poll() is not None, 120, "the refused daemon to exit", [rogue])
    assert rogue.popen.returncode == 3 and "refused this site's key 2 times in a row" in rogue.text()

    # 2. after round 1: /metrics on the server and on a site
    wait_for(lambda: 1 in checkpoint_rounds(work), 300, "round 1", everyone)
    m["seconds_until_round_1"] = round(time.monotonic() - t0, 1)
    code, text = wait_for(lambda: (r := http_get(metrics_url)) and "fedsite_server_round " in r[1] and r, 30, "server metrics", [server])
    families = _families(text)
    assert code == 200 and SERVER_SERIES <= set(families), SERVER_SERIES - set(families)
    assert families["fedsite_server_round"].samples[0].value >= 1
    assert families["fedsite_server_participating_sites"].samples[0].value == 3
    assert families["fedsite_server_bytes_sent"].samples[0].value > 0
    code, text = http_get(health["site-a"] + "/metrics")
    families = _families(text)
    assert code == 200 and SITE_SERIES <= set(families), SITE_SERIES - set(families)
    assert families["fedsite_site_train_samples"].samples[0].value > 0
    assert families["fedsite_site_images_per_second"].samples[0].value > 0

    # 3. SIGKILL the victim's whole tree while it trains round 2
    wait_for(lambda: sites[VICTIM].text().count("Receiving: train message") >= 2, 300, f"{VICTIM} to receive round 2", everyone)
    state_file = tmp_path / "state" / VICTIM / "fedsite" / "local_state.pt"
    t_kill = time.monotonic()
    sites[VICTIM].crash()
    stored_sha, stored = _sha256(state_file), torch.load(state_file, weights_only=True)
    assert stored["round"] == 1  # round 2 never finished at the victim
    wait_for(lambda: 2 in checkpoint_rounds(work), 300, "round 2 to close without the killed site", everyone)
    m["seconds_from_site_kill_to_round_close"] = round(time.monotonic() - t_kill, 1)

    # 4. SIGKILL the server tree right after the round-2 checkpoint
    server.crash()
    assert checkpoint_rounds(work)[-1] == 2
    ckpt2 = torch.load(work / "federation" / "checkpoints" / "round-0002.pt", weights_only=True)
    round2 = ckpt2["history"][1]
    assert round2["train_sites"] == ["site-a", "site-b"] and VICTIM in round2["failed"], round2
    assert round2["train_s"] < 300, "the round waited for its timeout instead of the heartbeat"
    m["round_2_seconds_with_dead_site"] = round(round2["train_s"], 1)
    assert _sha256(state_file) == stored_sha  # untouched while the site was down

    sites[VICTIM] = procs.start(VICTIM, *site_cmd[VICTIM])
    t_restart = time.monotonic()
    server = procs.start("server", "server", "--config", str(bundle / "server.yaml"))
    everyone = [server, *sites.values()]
    wait_for(lambda: not server.alive(), 420, "the resumed federation to finish", everyone)
    m["seconds_from_server_restart_to_finish"] = round(time.monotonic() - t_restart, 1)
    assert server.popen.returncode == 0, server.text()[-4000:]

    # resumed at round 3 from the round-2 checkpoint: rounds 1-2 are the checkpoint's
    result = federation_json(work)
    assert result["resumed_from"] == 3
    assert [e["round"] for e in result["history"]] == list(range(1, ROUNDS + 1))
    assert result["history"][:2] == ckpt2["history"]
    assert "resuming after the round-2 checkpoint" in server.text() or "resumed at round 3" in server.text()
    # the victim rejoined in round 3 with the local tensors it had stored (byte-identical)
    assert VICTIM in result["history"][2]["train_sites"], result["history"][2]
    recent = json.loads((tmp_path / "state" / VICTIM / "site_metrics.json").read_text())["recent"]
    round3 = next(r for r in recent if r["round"] == 3)
    assert round3["local_state_round"] == 1 and round3["local_state_checksum"] == stored["checksum"] == tensors_checksum(stored["tensors"])
    m["bytes_per_round"] = {e["round"]: {"sent": e["bytes_sent"], "received": e["bytes_received"]} for e in result["history"]}

    # 5. results.json (schema of `fedsite simulate`), the per-site table, the global model finite
    results = json.loads((work / "results.json").read_text())
    assert {"experiment", "sites", "num_classes", "runs", "summary", "wall_s"} <= set(results)
    assert sorted(results["runs"][0]["per_site"]) == SITES and "| site-c |" in server.text()
    last = torch.load(work / "federation" / "checkpoints" / f"round-{ROUNDS:04d}.pt", weights_only=True)
    assert all(bool(torch.isfinite(t.float()).all()) for t in last["arrays"].values())
    # the rogue never got a training (or any) message and never became a node
    assert "Receiving:" not in rogue.text()
    assert all("rogue" not in e["train_sites"] for e in result["history"])

    # predict with site-a's personalised model (latest global + its local tensors), input affine kept
    import nibabel as nib

    from client.predict import run as predict
    from argparse import Namespace

    image = sorted((fed["data"] / "site-a" / "images").iterdir())[0]
    out = tmp_path / "pred" / image.name
    assert predict(Namespace(site_config=bundle / "sites" / "site-a.yaml", input=image, output=out, run=None, device="cpu")) == 0
    pred, ref = nib.load(str(out)), nib.load(str(image))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}

    (tmp_path / "measurements.json").write_text(json.dumps(m, indent=1))
    print("\ndeployment measurements:", json.dumps(m, indent=1))
