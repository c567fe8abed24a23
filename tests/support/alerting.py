"""The Prometheus rule files and Alertmanager config in this repository, and the tools that check
them (promtool and amtool, from Debian's prometheus and prometheus-alertmanager packages)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
RULE_TESTS_DIR = REPO / "deploy" / "prometheus" / "tests"
ALERTMANAGER_CONFIG = REPO / "deploy" / "local" / "conf" / "prometheus" / "alertmanager.yml"


@dataclass(frozen=True)
class RuleGroup:
    """One group of a rule file: its name and the names of its rules, in order."""

    file: Path
    name: str
    rules: tuple[dict[str, Any], ...]

    @property
    def rule_names(self) -> list[str]:
        return [rule.get("alert") or rule["record"] for rule in self.rules]


def rule_files() -> list[Path]:
    """The files the stack's Prometheus loads (rule_files: deploy/prometheus/rules/*.yml)."""
    return sorted(RULES_DIR.glob("*.yml"))


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.yml"))


def rule_groups() -> list[RuleGroup]:
    return [
        RuleGroup(path, group["name"], tuple(group["rules"]))
        for path in rule_files()
        for group in yaml.safe_load(path.read_text())["groups"]
    ]


def alerts() -> dict[str, dict[str, Any]]:
    """Every alerting rule by name."""
    return {rule["alert"]: rule for g in rule_groups() for rule in g.rules if "alert" in rule}


def debian_tool(name: str, package: str) -> str:
    """The tool's path, found on PATH like the stack finds Debian's binaries; a test fails (never
    skips) without it, since CI installs it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found on PATH: apt-get install {package} "
            "(deploy/local/install-system-deps installs it)",
            pytrace=False,
        )
    return path


def run_tool(argv: list[str]) -> None:
    """Run a checker; fail the test with its whole output when it does not exit 0."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
    if done.returncode != 0:
        pytest.fail(
            f"`{' '.join(argv)}` exited {done.returncode}:\n{done.stdout}{done.stderr}",
            pytrace=False,
        )
