"""The stack's Prometheus evaluates the repository's rules and alerts through its Alertmanager,
which applies the inhibitions of deploy/local/conf/prometheus/alertmanager.yml; a worker's fatal
exit reaches it through the Pushgateway."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from prometheus_client import delete_from_gateway, generate_latest

from cdc_sink.app import SinkApp
from cdc_sink.config import load_config
from cdc_sink.errors import FatalError
from tests.support.alerting import ALERTMANAGER_CONFIG, rule_groups
from tests.support.alerting import alerts as alerting_rules
from tests.support.pipeline import run_cli, sink_env
from tests.support.stack import Endpoints

WAIT_SECONDS = 60  # a few evaluation intervals (5 s in the stack), on a busy machine


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, body: object | None = None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


def _alertmanager_url(stack: Endpoints) -> str:
    url = stack.get("CDC_ALERTMANAGER__URL")
    if not url:
        pytest.fail(
            "CDC_ALERTMANAGER__URL is not set: the stack has no Alertmanager", pytrace=False
        )
    return url


def _loaded_groups(prometheus: str) -> dict[str, dict[str, Any]]:
    groups = _get(f"{prometheus}/api/v1/rules")["data"]["groups"]
    return {group["name"]: group for group in groups}


def _until(check: Callable[[], str | None]) -> None:
    """Poll check() (None when satisfied, else what is wrong) until it passes or time is up."""
    deadline = time.monotonic() + WAIT_SECONDS
    problem = check()
    while problem is not None and time.monotonic() < deadline:
        time.sleep(1)
        problem = check()
    assert problem is None, problem


def test_prometheus_evaluates_every_rule_group(stack: Endpoints) -> None:
    """Every group and rule of deploy/prometheus/rules is loaded in order and evaluates cleanly."""
    prometheus = stack.prometheus_url
    expected = {group.name: group.rule_names for group in rule_groups()}
    assert expected, "no rule groups in deploy/prometheus/rules"
    if not expected.keys() <= _loaded_groups(prometheus).keys():
        # A Prometheus started before the rule files existed globs rule_files again on a reload
        # (the stack runs it with --web.enable-lifecycle); the configuration stays the same.
        _post(f"{prometheus}/-/reload")

    def check() -> str | None:
        loaded = _loaded_groups(prometheus)
        missing = sorted(expected.keys() - loaded.keys())
        if missing:
            return f"Prometheus has not loaded the groups {missing}; it has {sorted(loaded)}"
        for name, rules in expected.items():
            got = [rule["name"] for rule in loaded[name]["rules"]]
            if got != rules:
                return f"group {name}: Prometheus has {got}, the file has {rules}"
            unhealthy = [
                f"{rule['name']}: {rule['health']} {rule.get('lastError', '')}"
                for rule in loaded[name]["rules"]
                if rule["health"] != "ok"
            ]
            if unhealthy:
                return f"group {name} does not evaluate cleanly: {unhealthy}"
        return None

    _until(check)


def test_prometheus_sends_alerts_to_the_stack_alertmanager(stack: Endpoints) -> None:
    """Prometheus's active Alertmanager is the one CDC_ALERTMANAGER__URL names."""
    address = urllib.parse.urlsplit(_alertmanager_url(stack)).netloc

    def check() -> str | None:
        active = _get(f"{stack.prometheus_url}/api/v1/alertmanagers")["data"]
        urls = [am["url"] for am in active["activeAlertmanagers"]]
        if any(urllib.parse.urlsplit(url).netloc == address for url in urls):
            return None
        return f"Prometheus sends alerts to {urls}, not to {address}"

    _until(check)


def _running_inhibit_rules(alertmanager: str) -> list[dict[str, Any]]:
    """The inhibit rules of the configuration the Alertmanager has loaded."""
    original = _get(f"{alertmanager}/api/v2/status")["config"]["original"]
    rules: list[dict[str, Any]] = yaml.safe_load(original).get("inhibit_rules") or []
    return rules


def _inhibit_cases() -> list[tuple[str, str, list[str]]]:
    """(source alertname, target alertname, equal labels) for every inhibit rule."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())

    def names(matchers: list[str]) -> list[str]:
        found = [re.fullmatch(r'alertname=~?"([^"]*)"', m) for m in matchers]
        return [name for m in found if m for name in m.group(1).split("|")]

    return [
        (source, target, rule["equal"])
        for rule in config["inhibit_rules"]
        for source in names(rule["source_matchers"])
        for target in names(rule["target_matchers"])
    ]


def test_alertmanager_inhibits_warnings_behind_their_critical_alert(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """For each inhibit rule, a firing source alert suppresses the target alert with the same
    `equal` labels, and not the target alert about something else."""
    alertmanager = _alertmanager_url(stack)
    wanted = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())["inhibit_rules"]
    if _running_inhibit_rules(alertmanager) != wanted:
        # Started before the config had them: a reload re-reads the same file.
        _post(f"{alertmanager}/-/reload")
    running = _running_inhibit_rules(alertmanager)
    assert running == wanted, f"the stack's Alertmanager runs other inhibit rules: {running}"
    run = unique("inhibit")
    now = datetime.now(UTC)
    alerts: list[dict[str, Any]] = []
    expected: dict[tuple[str, str], str] = {}
    for index, (source, target, equal) in enumerate(_inhibit_cases()):
        same = {label: f"{run}-{index}" for label in equal}
        other = {label: f"{run}-{index}-other" for label in equal}
        for name, labels, case in (
            (source, same, "source"),
            (target, same, "inhibited"),
            (target, other, "other"),
        ):
            alerts.append(
                {
                    "labels": {"alertname": name, "cdc_test": run, "case": case, **labels},
                    "annotations": {"summary": "alerting integration test"},
                    "startsAt": now.isoformat(),
                    "endsAt": (now + timedelta(minutes=5)).isoformat(),
                }
            )
            expected[(name, json.dumps(labels, sort_keys=True))] = (
                "suppressed" if case == "inhibited" else "active"
            )
    assert alerts, "no inhibit rules in the Alertmanager config"
    _post(f"{alertmanager}/api/v2/alerts", alerts)
    try:
        query = urllib.parse.urlencode({"filter": f'cdc_test="{run}"'})

        def check() -> str | None:
            got = {}
            for alert in _get(f"{alertmanager}/api/v2/alerts?{query}"):
                labels = {
                    k: v
                    for k, v in alert["labels"].items()
                    if k not in ("alertname", "cdc_test", "case")
                }
                key = (alert["labels"]["alertname"], json.dumps(labels, sort_keys=True))
                got[key] = alert["status"]["state"]
            wrong = {k: got.get(k) for k, v in expected.items() if got.get(k) != v}
            return f"alert states differ from {expected}: {wrong}" if wrong else None

        _until(check)
    finally:
        for alert in alerts:
            alert["endsAt"] = datetime.now(UTC).isoformat()
        _post(f"{alertmanager}/api/v2/alerts", alerts)


def _expanded(alert: str) -> str:
    """The alert's expression with each recording rule it uses replaced by that rule's own
    expression: the stack's Prometheus evaluates it whatever rule files it has loaded."""
    recorded = {
        rule["record"]: rule["expr"] for g in rule_groups() for rule in g.rules if "record" in rule
    }
    expression = str(alerting_rules()[alert]["expr"])
    while True:
        used = [
            name
            for name in recorded
            if re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", expression)
        ]
        if not used:
            return expression
        for name in used:
            expression = re.sub(
                rf"(?<![\w:]){re.escape(name)}(?![\w:])", f"({recorded[name]})", expression
            )


def _query(prometheus: str, expression: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = _get(
        f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
    )["data"]["result"]
    return found


def test_a_worker_that_stops_on_a_fatal_error_fires_cdc_fatal_error(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """A worker that stops on a fatal error (here: migrations not applied, and it may not apply
    them) counts it, pushes the time of its exit to the Pushgateway before the process leaves,
    and CdcFatalError's expression, evaluated by the stack's Prometheus, fires for its stage."""
    group = unique("g")
    env = sink_env(
        stack,
        topic=unique("cdc-events-fatal"),
        group=group,
        schema=unique("fatal"),
        sink__migrate_on_start="false",
        pushgateway__url=stack.pushgateway_url,
    )
    began = time.time()
    worker = SinkApp(load_config(env))
    with pytest.raises(FatalError, match="are not applied"):
        asyncio.run(worker.run())
    counted = generate_latest(worker.metrics.registry).decode()
    assert 'cdc_errors_total{kind="fatal",stage="migrate"} 1.0' in counted
    done = run_cli(env, "run")  # the same, as the process a pod runs: it exits
    assert done.returncode == 1, done.stderr
    pushed = f'cdc_fatal_exit_timestamp_seconds{{job="cdc-sink",consumer_group="{group}"}}'
    try:

        def check() -> str | None:
            exits = _query(stack.prometheus_url, pushed)
            if not exits or float(exits[0]["value"][1]) < began:
                return f"Prometheus has no exit of this run: {exits}"
            firing = _query(stack.prometheus_url, _expanded("CdcFatalError"))
            if not any(series["metric"].get("stage") == "migrate" for series in firing):
                return f"CdcFatalError's expression gives {firing}"
            return None

        _until(check)
    finally:
        delete_from_gateway(
            stack.pushgateway_url,
            job="cdc-sink",
            grouping_key={"instance": socket.gethostname(), "consumer_group": group},
        )
