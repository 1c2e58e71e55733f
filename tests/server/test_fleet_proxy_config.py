"""The fleet proxy's nginx.conf: Fleet paths forwarded to the loopback SuperLink, nothing else; no root paths."""

import re
import shutil
import subprocess

import pytest
import yaml

from server import fleet_proxy
from server.fleet_proxy import FLEET_PREFIX, ProxySpec, find_nginx, render_config
from server.provision import provision
from server.server_config import DaemonError, ServerConfig
from shared_models.config import ConfigError, load_config


def _spec(tmp_path, host="0.0.0.0"):
    provision(tmp_path / "bundle", "127.0.0.1", ["site-a"])
    server = tmp_path / "bundle" / "server"
    return ProxySpec(host, 19092, 19093, server / "server.crt", server / "server.key", server / "ca.crt")


def _locations(conf):
    return {m.group(1): m.group(2) for m in re.finditer(r"location ([^{]+?) \{(.*?)\n        \}", conf, re.S)}


def test_only_the_fleet_prefix_is_forwarded_and_everything_else_is_refused(tmp_path):
    conf = render_config(_spec(tmp_path), tmp_path / "prefix")
    locations = _locations(conf)
    forwarding = [loc for loc, body in locations.items() if "proxy_pass" in body or "grpc_pass" in body]
    assert forwarding == [FLEET_PREFIX] == ["/v1/fleet/"]
    assert "server 127.0.0.1:19093;" in conf and "listen 19092 ssl http2;" in conf
    assert "return 403" in locations["/"] and "grpc-status 7" in locations["= /fedsite-denied-grpc"]
    assert "proxy_ssl_verify on;" in locations[FLEET_PREFIX]


def test_every_file_nginx_writes_is_under_the_prefix(tmp_path):
    prefix = tmp_path / "prefix"
    conf = render_config(_spec(tmp_path, host="::"), prefix)
    paths = re.findall(r"^\s*(?:pid|error_log|access_log|\w+_temp_path) (\S+?);?(?: |$)", conf, re.M)
    assert len(paths) == 8 and all(p.startswith(str(prefix)) for p in paths), paths
    assert "listen [::]:19092 ssl http2;" in conf


@pytest.mark.skipif(shutil.which("nginx") is None and not fleet_proxy.NGINX_FALLBACK.is_file(), reason="nginx not installed")
def test_nginx_accepts_the_rendered_config_without_root_paths(tmp_path):
    prefix = tmp_path / "prefix"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / kind).mkdir(parents=True)
    (prefix / "nginx.conf").write_text(render_config(_spec(tmp_path), prefix))
    done = subprocess.run([find_nginx(), "-t", "-c", str(prefix / "nginx.conf"), "-p", str(prefix), "-e", str(prefix / "error.log")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_a_missing_nginx_is_one_line_naming_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(fleet_proxy.shutil, "which", lambda _name: None)
    monkeypatch.setattr(fleet_proxy, "NGINX_FALLBACK", tmp_path / "no-nginx")
    with pytest.raises(DaemonError, match="nginx") as info:
        find_nginx()
    assert "\n" not in str(info.value) and "apt-get install nginx" in str(info.value)


def test_the_internal_port_must_differ_from_the_public_one(tmp_path):
    provision(tmp_path, "127.0.0.1", ["site-a"])
    doc = yaml.safe_load((tmp_path / "server.yaml").read_text())
    assert doc["superlink"]["internal-port"] == doc["superlink"]["port"] + 1
    doc["superlink"]["internal-port"] = doc["superlink"]["port"]
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="internal-port"):
        load_config(ServerConfig, tmp_path / "server.yaml")
