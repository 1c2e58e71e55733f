"""The container images and the compose demo agree with the package and with provisioning."""

import re
import tomllib

import pytest
import yaml

from client.daemon import SiteConfig
from server.provision import provision
from server.server_config import ServerConfig
from shared_models.config import load_config
from tests.deploy.core_install.sitecustomize import ABSENT
from tests.deploy.harness import REPO

IMAGES = ["Dockerfile", "Dockerfile.cuda"]
SITES = ["site-a", "site-b", "site-c"]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_names(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\s]", s, maxsplit=1)[0] for s in specs}


def test_the_core_dependencies_bring_neither_ray_nor_matplotlib():
    project = pyproject()["project"]
    core = requirement_names(project["dependencies"])
    assert not any(name.partition("[")[0] in ABSENT for name in core)
    assert "flwr" in core and "flwr[simulation]" not in core  # the simulation extra pulls Ray
    extras = project["optional-dependencies"]
    assert extras["site"] == []
    assert {"flwr[simulation]", "matplotlib"} <= requirement_names(extras["sim"])
    assert "matplotlib" in requirement_names(extras["report"])
    assert any(s.startswith("fedsite[") and "sim" in s for s in extras["test"])  # the tests run the simulations


@pytest.mark.parametrize("image", IMAGES)
def test_an_image_installs_the_site_extra_of_every_package_and_checks_health(image):
    text = (REPO / "deploy" / image).read_text()
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, flags=re.M))
    assert copied == packages
    assert re.search(r'pip install [^\n]*"\.\[site\]"', text)
    assert re.search(r"^HEALTHCHECK .*\\\n\s+CMD .*FEDSITE_HEALTH_URL", text, flags=re.M)
    assert re.search(r"^USER (?!root)\w+", text, flags=re.M)
    assert "FLWR_TELEMETRY_ENABLED=0" in text and "--insecure" not in text


def test_compose_health_urls_and_scrape_targets_match_the_provisioned_ports(tmp_path):
    provision(tmp_path, "server", SITES)
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())["services"]
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    targets = {t for job in scrape for cfg in job["static_configs"] for t in cfg["targets"]}
    server = load_config(ServerConfig, tmp_path / "server.yaml")
    assert compose["server"]["environment"]["FEDSITE_HEALTH_URL"] == f"http://127.0.0.1:{server.metrics.port}/health"
    assert f"server:{server.metrics.port}" in targets
    for site in SITES:
        port = load_config(SiteConfig, tmp_path / "sites" / f"{site}.yaml").health.port
        service = compose[site]
        assert service["environment"]["FEDSITE_HEALTH_URL"] == f"http://127.0.0.1:{port}/health"
        assert service["environment"]["FLWR_TELEMETRY_ENABLED"] == "0"
        assert service["expose"] == [str(port)] and f"{site}:{port}" in targets
