"""Alertmanager's routes: a critical alert pages through the PagerDuty receiver, a warning goes
to the Slack receiver, each configured by the stack's settings. The Alertmanager is a private
instance of the stack script (its own state folder and ports), so the shared one keeps its
receivers; both receivers' endpoints are one local webhook server."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.support.alerting import ALERTMANAGER_CONFIG
from tests.support.prometheus import free_port
from tests.support.stack import REPO, STACK

WAIT_SECONDS = 60
ROUTING_KEY = "cdc-test-routing-key"


class Webhooks:
    """A local HTTP server that records every JSON body posted to it, by path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        webhooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with webhooks.lock:
                    webhooks.received.append((self.path, body))
                self.send_response(202)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for got, body in self.received if got == path]


@pytest.fixture
def webhooks() -> Iterator[Webhooks]:
    hooks = Webhooks()
    thread = threading.Thread(target=hooks.server.serve_forever, daemon=True)
    thread.start()
    yield hooks
    hooks.server.shutdown()
    hooks.server.server_close()


def _free_port_offset() -> int:
    """A port offset at which the stack's Alertmanager port (19094 + offset) is free."""
    port = free_port()
    return port - 19094 if port > 19094 else _free_port_offset()


def _stack(env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [str(STACK), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"stack {' '.join(args)}:\n{done.stdout}{done.stderr}"


def _stack_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cdc_local_stack", REPO / "deploy/local/stack.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def _post_alerts(url: str, alerts: list[dict[str, str]]) -> None:
    now = datetime.now(UTC)
    body = [
        {
            "labels": labels,
            "annotations": {"summary": f"{labels['alertname']} from the routing test"},
            "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(minutes=5)).isoformat(),
        }
        for labels in alerts
    ]
    request = urllib.request.Request(
        f"{url}/api/v2/alerts",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


def test_critical_alerts_page_and_warnings_go_to_chat(webhooks: Webhooks, tmp_path: Path) -> None:
    """With the receivers' settings, a critical alert posted to the real Alertmanager arrives at
    the PagerDuty endpoint as an Events API v2 trigger with the routing key, a warning arrives
    at the Slack webhook in its channel, and neither reaches the other receiver."""
    offset = _free_port_offset()
    env = {
        "CDC_STACK_HOME": str(tmp_path / "stack"),
        "CDC_STACK_PORT_OFFSET": str(offset),
        "CDC_STACK_PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "CDC_STACK_PAGERDUTY_URL": f"{webhooks.url}/pagerduty",
        "CDC_STACK_SLACK_WEBHOOK_URL": f"{webhooks.url}/slack",
        "CDC_STACK_SLACK_CHANNEL": "#cdc-alerts",
    }
    _stack(env, "up", "alertmanager")
    try:
        rendered = tmp_path / "stack" / "run" / "alertmanager" / "alertmanager.yml"
        assert stat.S_IMODE(rendered.stat().st_mode) == 0o600
        _post_alerts(
            f"http://127.0.0.1:{19094 + offset}",
            [
                {"alertname": "HighConsumerLag", "severity": "critical", "topic": "orders"},
                {"alertname": "CdcDeadLettersArriving", "severity": "warning", "topic": "orders"},
            ],
        )
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline and not (
            webhooks.bodies("/pagerduty") and webhooks.bodies("/slack")
        ):
            time.sleep(0.5)
        pages, chats = webhooks.bodies("/pagerduty"), webhooks.bodies("/slack")
        assert [(p["routing_key"], p["event_action"]) for p in pages] == [(ROUTING_KEY, "trigger")]
        assert "HighConsumerLag" in pages[0]["payload"]["summary"]
        assert "CdcDeadLettersArriving" not in json.dumps(pages)
        assert [c["channel"] for c in chats] == ["#cdc-alerts"]
        assert "CdcDeadLettersArriving" in json.dumps(chats)
        assert "HighConsumerLag" not in json.dumps(chats)
    finally:
        _stack(env, "down", "alertmanager")


def test_receivers_without_settings_send_nothing() -> None:
    """Without the settings the receivers keep no integration (alerts stay in Alertmanager);
    with only the routing key, pages go to PagerDuty's own Events API v2."""
    stack = _stack_module()
    base = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert stack.alertmanager_config(base, {}) == base
    paged = stack.alertmanager_config(base, {"CDC_STACK_PAGERDUTY_ROUTING_KEY": "k"})
    receivers = {receiver["name"]: receiver for receiver in paged["receivers"]}
    assert receivers["pager"]["pagerduty_configs"] == [
        {"routing_key": "k", "url": stack.PAGERDUTY_EVENTS_URL, "send_resolved": True}
    ]
    assert receivers["chat"] == {"name": "chat"}
    assert receivers["local"] == {"name": "local"}
    assert paged["route"] == base["route"]
    assert paged["inhibit_rules"] == base["inhibit_rules"]
