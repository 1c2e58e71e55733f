"""A one-host pilot from one bundle, as hospital IT would try it first (real processes on 127.0.0.1).

`fedsite provision --listen 127.0.0.1 --site-root R` writes the bundle; the server
and three site daemons start from its files as written, no file edited: every
listener of the four daemons gets its own port from the bundle's layout. One site
holds two bad cases (a truncated image, a label value 7 in a 4-class federation):
it trains on its other cases, the server records the rejections, the run
completes and the server exits 0. Then a taken port is refused before anything
starts, with one line naming the YAML key.
"""

import json
import random
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.deploy.harness import REPO, Processes, http_get, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SITES = ["site-a", "site-b", "site-c"]
BAD_SITE = "site-c"
ROUNDS = 2
CASES = 6


@pytest.fixture
def procs(tmp_path):
    registry = Processes(tmp_path)
    yield registry
    registry.close()


def _layout_is_free(port: int, sites: int) -> bool:
    wanted = [port, port + 1, port + 308, *(port + 2 + i for i in range(sites)), *(port + 408 + i for i in range(sites))]
    for p in wanted:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _bundle_port(sites: int) -> int:
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 50_000)
        if _layout_is_free(port, sites):
            return port
    raise RuntimeError("no free port layout on 127.0.0.1")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _site_data(tmp_path, root):
    """The synthetic hospitals, each at <root>/<site>/data, with two bad cases at BAD_SITE."""
    from simulations.domain_shift import DEFAULT_PROFILES, generate_dataset

    profiles = tuple(p for p in DEFAULT_PROFILES if p.name in SITES)
    data = generate_dataset(tmp_path / "synth", profiles=profiles, cases_per_site=CASES, size=(32, 32), num_classes=4)
    for site in SITES:
        (root / site).mkdir(parents=True)
        (data / site).rename(root / site / "data")
    bad = root / BAD_SITE / "data"
    images = sorted((bad / "images").iterdir())
    truncated = images[0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    label_path = sorted((bad / "labels").iterdir())[1]
    label = nib.load(label_path)
    values = np.asarray(label.dataobj).copy()
    values.flat[0] = 7
    nib.save(nib.Nifti1Image(values, label.affine), label_path)
    return truncated, label_path


def test_three_sites_on_one_host_run_from_the_bundle_unedited_with_bad_cases_at_one_site(tmp_path, procs):
    root, bundle = tmp_path / "srv", tmp_path / "bundle"
    truncated, label7 = _site_data(tmp_path, root)
    port = _bundle_port(len(SITES))
    made = _cli("provision", "--server-host", "127.0.0.1", "--listen", "127.0.0.1", "--port", str(port),
                "--site-root", str(root), "--sites", ",".join(SITES), "--out", str(bundle))
    assert made.returncode == 0, made.stderr
    written = {p: p.read_bytes() for p in bundle.rglob("*.yaml")}

    server = procs.start("server", "server", "--config", str(bundle / "server.yaml"), "--rounds", str(ROUNDS))
    sites = {s: procs.start(s, "client", "--config", str(bundle / "sites" / f"{s}.yaml")) for s in SITES}
    everyone = [server, *sites.values()]
    health = {s: yaml.safe_load((bundle / "sites" / f"{s}.yaml").read_text())["health"]["port"] for s in SITES}
    assert len(set(health.values())) == len(SITES)
    wait_for(lambda: all(http_get(f"http://127.0.0.1:{health[s]}/health")[0] == 200 for s in SITES), 180, "three sites connected", everyone)
    for s in SITES:  # "running" is the SuperNode's own answer (its gRPC health service), not a guess
        assert json.loads(http_get(f"http://127.0.0.1:{health[s]}/health")[1])["supernode_health"] == "SERVING"
    wait_for(lambda: server.popen.poll() is not None, 480, "the server to finish the run", everyone)
    assert server.popen.returncode == 0, server.text()[-3000:]

    results = json.loads((bundle / "work" / "results.json").read_text())
    fed = json.loads((bundle / "work" / "federation" / "federation.json").read_text())
    assert sorted(results["sites"]) == SITES
    assert len(fed["history"]) == ROUNDS and all(sorted(e["train_sites"]) == SITES for e in fed["history"])
    assert fed["rejected_cases"] == {BAD_SITE: 2}
    bad_log = sites[BAD_SITE].text()
    assert str(truncated) in bad_log and str(label7) in bad_log
    assert {p: p.read_bytes() for p in bundle.rglob("*.yaml")} == written  # nothing rewrote the operator's files
    assert all(s.alive() for s in sites.values())  # the sites stay up for the next run


def test_a_taken_port_is_one_line_naming_the_yaml_key(tmp_path):
    root, bundle = tmp_path / "srv", tmp_path / "bundle"
    for site in SITES[:1]:
        for sub in ("images", "labels"):
            (root / site / "data" / sub).mkdir(parents=True)
        (root / site / "data" / "images" / "case-000.nii.gz").write_bytes(b"")
    port = _bundle_port(1)
    assert _cli("provision", "--server-host", "127.0.0.1", "--listen", "127.0.0.1", "--port", str(port),
                "--site-root", str(root), "--sites", SITES[0], "--out", str(bundle)).returncode == 0
    site_yaml = bundle / "sites" / f"{SITES[0]}.yaml"
    cases = [("client", site_yaml, "health.port", port + 408), ("client", site_yaml, "runtime-port", port + 2),
             ("server", bundle / "server.yaml", "metrics.port", port + 308), ("server", bundle / "server.yaml", "superlink.port", port)]
    for command, config, key, taken in cases:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", taken))
            holder.listen()
            done = _cli(command, "--config", str(config))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (key, done.stderr)
        assert len(lines) == 1 and f"{key}: port {taken}" in lines[0] and str(config) in lines[0], (key, done.stderr)
