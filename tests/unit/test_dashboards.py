"""The Grafana dashboards and their provisioning files: what Grafana needs to load them and
what makes them portable between Prometheus servers and deployments."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.support.dashboards import DASHBOARDS, GRAFANA, load, panel_queries, panels

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_there_are_the_dashboards() -> None:
    """Pipeline, reconciliation and Kafka/agent dashboards exist, each with its own uid."""
    uids = {load(path)["uid"] for path in DASHBOARDS}
    assert {"cdc-sink-pipeline", "cdc-sink-reconciliation", "cdc-sink-kafka"} <= uids
    assert len(uids) == len(DASHBOARDS)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_refreshes_every_30_s_from_a_chosen_prometheus(path: Path) -> None:
    """The dashboard refreshes every 30 s, offers a Prometheus data source variable, and every
    panel and query uses that variable, not a data source of one installation."""
    board = load(path)
    assert board["refresh"] == "30s"
    (variable,) = (v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    for panel in panels(board):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_no_instance_or_host_is_named(path: Path) -> None:
    """Queries select workers through variables only: no instance, pod or address is written
    into them."""
    fixed = re.compile(r'\b(instance|pod|host|node)\s*(=|=~|!=)\s*"(?!\$)')
    for title, expression in panel_queries(path):
        assert not fixed.search(expression), f"{title}: {expression}"
        assert not re.search(r"\d+\.\d+\.\d+\.\d+|localhost", expression), title


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_panels_do_not_overlap(path: Path) -> None:
    """No two panels share a cell of Grafana's 24-column grid."""
    taken: dict[tuple[int, int], str] = {}
    for panel in load(path)["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken.get((x, y))}"
                taken[(x, y)] = panel["title"]


def test_provisioning_loads_the_dashboards_and_a_prometheus() -> None:
    """The provisioning files declare a Prometheus data source from the environment and a file
    provider for the dashboards' folder."""
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (prometheus,) = source["datasources"]
    assert (prometheus["type"], prometheus["url"]) == ("prometheus", "${PROMETHEUS_URL}")
    boards = yaml.safe_load((GRAFANA / "provisioning/dashboards/cdc-sink.yml").read_text())
    (provider,) = boards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards/cdc-sink"
