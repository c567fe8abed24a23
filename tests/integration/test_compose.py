"""deploy/compose/compose.yaml, checked by Docker Compose itself (`docker compose config`, built
from its Go module; no Docker engine needed) and for pinned images."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy_tools import DeployTools, install_deploy_tools, run, run_ok
from tests.support.stack import REPO

COMPOSE = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE / "compose.yaml"
# The architecture's local set, by the role each service plays.
SERVICES = {
    "cassandra",
    "debezium",
    "kafka",
    "registry",
    "postgres",
    "vault",
    "prometheus",
    "pushgateway",
    "alertmanager",
    "grafana",
    "jaeger",
    "migrate",
    "sink",
}
PINNED = re.compile(r"^[\w./-]+:(?!latest$)[\w][\w.-]*(@sha256:[0-9a-f]{64})?$")


@pytest.fixture(scope="module")
def tools() -> DeployTools:
    return install_deploy_tools()


@pytest.fixture(scope="module")
def model(tools: DeployTools) -> dict[str, Any]:
    """The project as Compose resolves it: anchors merged, paths made absolute, validated."""
    out = run_ok([tools.docker_compose, "-f", COMPOSE_FILE, "config", "--format", "json"])
    return json.loads(out)


def test_compose_config_accepts_the_file(tools: DeployTools) -> None:
    """`docker compose config --quiet` validates the file against the Compose specification."""
    run_ok([tools.docker_compose, "-f", COMPOSE_FILE, "config", "--quiet"])


def test_compose_config_refuses_an_invalid_file(tools: DeployTools, tmp_path: Path) -> None:
    """The check has teeth: a misspelt service key and a wrong type are each refused."""
    for broken in (
        "services:\n  a:\n    image: busybox:1.37\n    comand: [true]\n",
        "services:\n  a:\n    image: busybox:1.37\n    ports: 80\n",
    ):
        path = tmp_path / "compose.yaml"
        path.write_text(broken)
        done = run([tools.docker_compose, "-f", path, "config", "--quiet"], cwd=tmp_path)
        assert done.returncode != 0, broken


def test_the_architecture_set_is_there(model: dict[str, Any]) -> None:
    """Every service of the architecture's local set is defined."""
    assert set(model["services"]) == SERVICES


def images(model: dict[str, Any]) -> dict[str, str]:
    return {name: service.get("image", "") for name, service in model["services"].items()}


def base_images() -> dict[str, str]:
    """FROM lines of the Containerfiles compose.yaml builds, besides the sink's own."""
    found = {}
    for path in sorted(COMPOSE.rglob("Containerfile")):
        for image in re.findall(r"^FROM\s+(\S+)", path.read_text(), flags=re.MULTILINE):
            found[f"{path.relative_to(REPO)} FROM {image}"] = image
    return found


def test_every_image_is_pinned(model: dict[str, Any]) -> None:
    """Every service names an image with a version tag (never `latest`, never none), and so does
    every FROM of the Containerfiles it builds."""
    every = {**images(model), **base_images()}
    loose = {where: image for where, image in every.items() if not PINNED.match(image)}
    assert not loose, f"images without a pinned version: {loose}"


def test_pinning_check_catches_loose_tags() -> None:
    """`latest`, a missing tag and an empty name fail the pinning check; a version passes."""
    assert PINNED.match("prom/prometheus:v3.1.0")
    assert PINNED.match("postgres:15.10@sha256:" + "a" * 64)
    for loose in ("prom/prometheus:latest", "prom/prometheus", "", "postgres:@sha256:"):
        assert not PINNED.match(loose), loose


def test_sink_runs_the_built_image_with_reconciliation(model: dict[str, Any]) -> None:
    """Both sink services use the image built from deploy/container/Containerfile, migrate runs
    first, and the workers reconcile against the compose Cassandra."""
    for name in ("migrate", "sink"):
        service = model["services"][name]
        assert service["image"] == "cdc-sink:local"
        assert Path(service["build"]["context"]) == REPO
        assert service["build"]["dockerfile"] == "deploy/container/Containerfile"
        assert service["read_only"] is True
    sink = model["services"]["sink"]
    assert sink["command"] == ["run"]
    assert sink["environment"]["CDC_RECONCILIATION__ENABLED"] == "true"
    assert sink["environment"]["CDC_CASSANDRA__CONTACT_POINTS"] == "cassandra"
    assert sink["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_grafana_and_prometheus_read_the_repository_sources(model: dict[str, Any]) -> None:
    """Grafana is provisioned with deploy/grafana/dashboards and Prometheus loads
    deploy/prometheus/rules, mounted from the repository, not copied."""
    mounts = {
        name: {
            Path(volume["source"])
            for volume in service.get("volumes", [])
            if volume["type"] == "bind"
        }
        for name, service in model["services"].items()
    }
    assert REPO / "deploy" / "grafana" / "dashboards" in mounts["grafana"]
    assert REPO / "deploy" / "prometheus" / "rules" in mounts["prometheus"]
