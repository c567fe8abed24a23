"""The alerting rules: valid for Prometheus, unit-tested with promtool, every alert covered."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.alerting import (
    ALERTMANAGER_CONFIG,
    RULE_TESTS_DIR,
    alerts,
    debian_tool,
    rule_files,
    rule_test_files,
    run_tool,
)

SEVERITIES = {"critical", "warning"}


def test_rule_and_test_files_exist() -> None:
    """There are rule files for the stack to load and promtool test files for them."""
    assert rule_files(), "no deploy/prometheus/rules/*.yml"
    assert rule_test_files(), "no deploy/prometheus/tests/*.yml"


@pytest.mark.parametrize("path", rule_files(), ids=lambda p: p.name)
def test_promtool_accepts_rule_file(path: Path) -> None:
    """`promtool check rules` finds no error in the file."""
    run_tool([debian_tool("promtool", "prometheus"), "check", "rules", str(path)])


@pytest.mark.parametrize("path", rule_test_files(), ids=lambda p: p.name)
def test_promtool_rule_tests_pass(path: Path) -> None:
    """Every case of the promtool test file passes (`promtool test rules`)."""
    run_tool([debian_tool("promtool", "prometheus"), "test", "rules", str(path)])


def _test_documents() -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in rule_test_files()]


def test_every_rule_file_is_under_test() -> None:
    """Each rule file is named by a promtool test file."""
    tested = {
        (RULE_TESTS_DIR / name).resolve() for doc in _test_documents() for name in doc["rule_files"]
    }
    untested = [path.name for path in rule_files() if path.resolve() not in tested]
    assert not untested, f"rule files no promtool test loads: {untested}"


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    """Each alert is expected to fire at some evaluation and expected silent at another."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for doc in _test_documents():
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert not names - firing, f"alerts never expected to fire: {sorted(names - firing)}"
    assert not names - quiet, f"alerts never expected to stay quiet: {sorted(names - quiet)}"


def test_alerts_carry_severity_and_runbook() -> None:
    """Each alert has a severity of critical or warning, a summary, a description and a runbook."""
    problems = []
    for name, rule in alerts().items():
        if rule.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity must be one of {sorted(SEVERITIES)}")
        for key in ("summary", "description", "runbook"):
            if not str(rule.get("annotations", {}).get(key, "")).strip():
                problems.append(f"{name}: annotation {key} is missing")
    assert not problems, "\n".join(problems)


def test_issue_alerts_have_their_thresholds() -> None:
    """The paging alerts of the architecture exist with its thresholds and durations, and the
    reconciliation alerts read the pushed results (job="cdc_reconciliation"), never a pod's own."""
    rules = alerts()
    pushed = '{job="cdc_reconciliation"}'
    expected = {
        "HighConsumerLag": ("topic:cdc_backlog_depth:sum > 10000", "5m", "critical"),
        "HighLatency": ("table:cdc_processing_latency_seconds:p95_5m > 2", "5m", "critical"),
        "HighErrorRate": ("sum(rate(cdc_errors_total[5m])) > 10", "5m", "critical"),
        "ReconciliationDriftCritical": (
            f"cdc_reconciliation_drift_percentage{pushed} > 5",
            "2m",
            "critical",
        ),
        "ReconciliationDriftWarning": (
            f"cdc_reconciliation_drift_percentage{pushed} > 1",
            "2m",
            "warning",
        ),
    }
    got = {
        name: (rules[name]["expr"], rules[name].get("for"), rules[name]["labels"]["severity"])
        for name in expected
    }
    assert got == expected
    for name, rule in rules.items():
        if "cdc_reconciliation_" in rule["expr"]:
            assert pushed in rule["expr"], f"{name} reads a pod's own reconciliation gauges"


def test_alertmanager_config_is_valid() -> None:
    """`amtool check-config` accepts the stack's Alertmanager config."""
    run_tool(
        [debian_tool("amtool", "prometheus-alertmanager"), "check-config", str(ALERTMANAGER_CONFIG)]
    )


def test_inhibit_rules_name_existing_alerts() -> None:
    """Every alert name an inhibit rule matches is an alert of the rule files."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    names = set(alerts())
    unknown = []
    for rule in config["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            found = re.fullmatch(r'alertname(=~|=)"([^"]*)"', matcher)
            if not found:
                continue
            pattern = found.group(2) if found.group(1) == "=~" else re.escape(found.group(2))
            if not any(re.fullmatch(pattern, name) for name in names):
                unknown.append(matcher)
            elif found.group(1) == "=~":
                unknown += [
                    f"{matcher}: {part}" for part in found.group(2).split("|") if part not in names
                ]
    assert not unknown, f"inhibit rules match no alert: {unknown}"
