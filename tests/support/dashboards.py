"""The Grafana dashboards of deploy/grafana/dashboards and the PromQL their panels and
variables run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows, those inside collapsed rows included."""
    found = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def panel_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, expression) for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in panels(load(path))
        for target in panel["targets"]
    ]


def variable_queries(path: Path) -> list[tuple[str, str]]:
    """(label, series selector) of every `label_values(selector, label)` variable."""
    found = []
    for variable in load(path)["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text.strip())
        assert match, f"variable {variable['name']}: {text} is not label_values(selector, label)"
        found.append((match.group(2), match.group(1)))
    return found
