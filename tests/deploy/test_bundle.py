"""Deployment files and the provisioned bundle, without starting anything."""

import os
import re
import stat

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from client.daemon import SiteConfig
from server.app_bundle import build_fab, fab_hash, stage_app
from server.server_config import ServerConfig, run_config
from server.metrics import StatusCollector, round_status, write_status
from server.provision import provision
from server.run_config import ServerRunConfig
from shared_models.config import load_config
from tests.deploy.harness import REPO

SITES = ["site-a", "site-b", "site-c"]


def test_nothing_under_deploy_starts_a_component_insecurely():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "deploy").rglob("*") if p.is_file() and "--insecure" in p.read_text(errors="replace")]
    assert offenders == []
    # and the server daemon never passes it to the SuperLink
    for daemon in ("server/daemon.py", "client/daemon.py"):
        assert "--insecure" not in (REPO / daemon).read_text()


def test_provision_writes_a_pki_with_owner_only_private_keys(tmp_path):
    # Execute
    provision(tmp_path, "fl.example.org", SITES)
    # Assert: private keys are 0600, public material is readable
    private = [tmp_path / "ca" / "ca.key", tmp_path / "server" / "server.key", *(tmp_path / "sites" / s / "auth.key" for s in SITES)]
    for path in private:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    # the server certificate is signed by the CA and valid for the host and loopback
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server" / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    # site keys in the OpenSSH EC format Flower reads (flower-supernode / flwr supernode register)
    key = serialization.load_ssh_private_key((tmp_path / "sites" / "site-a" / "auth.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    pub = serialization.load_ssh_public_key((tmp_path / "server" / "site-keys" / "site-a.pub").read_bytes())
    assert pub.public_numbers() == key.public_key().public_numbers()
    # the YAMLs load into the daemons' typed configs; a site's file names only its own material
    server = load_config(ServerConfig, tmp_path / "server.yaml")
    assert sorted(server.sites) == SITES
    for site in SITES:
        cfg = load_config(SiteConfig, tmp_path / "sites" / f"{site}.yaml")
        assert cfg.site_id == site and cfg.superlink == "fl.example.org:9092"
        text = (tmp_path / "sites" / f"{site}.yaml").read_text()
        assert not any(other in text for other in SITES if other != site)
        assert sorted(p.name for p in (tmp_path / "sites" / site).iterdir()) == ["auth.key", "auth.pub", "ca.crt"]


def test_provision_adds_a_site_and_rotates_a_key_with_the_same_ca(tmp_path):
    provision(tmp_path, "fl.example.org", SITES[:2])
    ca_before = (tmp_path / "ca" / "ca.crt").read_bytes()
    key_a = (tmp_path / "sites" / "site-a" / "auth.key").read_bytes()
    key_b = (tmp_path / "sites" / "site-b" / "auth.key").read_bytes()
    provision(tmp_path, "fl.example.org", ["site-c"], rotate=("site-b",))
    assert (tmp_path / "ca" / "ca.crt").read_bytes() == ca_before
    assert (tmp_path / "sites" / "site-a" / "auth.key").read_bytes() == key_a
    assert (tmp_path / "sites" / "site-b" / "auth.key").read_bytes() != key_b
    assert sorted(yaml.safe_load((tmp_path / "server.yaml").read_text())["sites"]) == SITES


def test_staged_app_declares_defaults_the_run_config_overrides_and_has_one_hash(tmp_path):
    import tomllib

    from flwr.common.config import flatten_dict, fuse_dicts

    provision(tmp_path, "127.0.0.1", SITES)
    cfg = load_config(ServerConfig, tmp_path / "server.yaml")
    app = stage_app(tmp_path / "app")
    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    # the federation's values (node -> site map included) override the bundle's defaults, as Flower fuses them
    fused = fuse_dicts(flatten_dict(pyproject["tool"]["flwr"]["app"]["config"]), run_config(cfg, tmp_path / "out", {"site-a": 7}))
    run_cfg = ServerRunConfig.from_run_config(fused)
    assert run_cfg.min_nodes == 3 and run_cfg.resume and run_cfg.out_dir == str(tmp_path / "out")
    assert run_cfg.registered_sites == {7: "site-a"}
    assert (app / "client" / "app.py").exists() and not list(app.rglob("__pycache__"))
    # the bundle does not depend on the federation: one FAB hash per code version, the one provisioned sites approve
    assert fab_hash(tmp_path / "a") == fab_hash(tmp_path / "b") == build_fab(app)[1]
    assert yaml.safe_load((tmp_path / "sites" / "site-a.yaml").read_text())["approved-fabs"] == [build_fab(app)[1]]


def test_server_metrics_parse_and_carry_the_issue_series(tmp_path):
    # Prepare: the status a round writes
    entry = {"round": 2, "train_sites": ["site-a", "site-b"], "rejected": {"site-c": "w: 4 NaN and 0 Inf values"}, "aggregate_s": 0.01,
             "bytes_sent": 300, "bytes_received": 200, "train_loss": {"site-a": 0.5, "site-b": 0.7}, "dice": {"site-a": 0.8}}
    result = {"run_name": "r", "sites": SITES, "history": [entry], "bytes_sent": 600, "bytes_received": 400}
    write_status(tmp_path, round_status(result, entry, 5))
    registry = CollectorRegistry()
    registry.register(StatusCollector(tmp_path / "status.json"))
    # Execute
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    # Assert
    assert families["fedsite_server_round"].samples[0].value == 2
    assert families["fedsite_server_participating_sites"].samples[0].value == 2
    assert families["fedsite_server_rejected_sites"].samples[0].value == 1
    rejected = {s.labels["site"]: s.value for s in families["fedsite_server_rejected_updates"].samples if s.name.endswith("_total")}
    assert rejected == {"site-a": 0, "site-b": 0, "site-c": 1}
    assert families["fedsite_server_bytes_sent"].samples[0].value == 600
    assert {s.labels["site"] for s in families["fedsite_server_site_train_loss"].samples} == {"site-a", "site-b"}
    assert re.match(r"fedsite_server_aggregation_seconds", families["fedsite_server_aggregation_seconds"].name)
