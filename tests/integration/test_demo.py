"""The README's main job: the demo's real pipeline (CQL → Debezium agent → sink, checked by
checksum jobs) and its synthetic Avro stream both land exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.support.stack import REPO, Endpoints


def demo(env: dict[str, str], *args: str, unset: str = "") -> subprocess.CompletedProcess[str]:
    """`python -m cdc_synth.demo --json ARGS` on the stack, without the variable `unset`."""
    full = {**os.environ, **env, "PYTHONPATH": str(REPO / "src")}
    full.pop(unset, None)
    return subprocess.run(
        [sys.executable, "-m", "cdc_synth.demo", "--json", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_demo_lands_exactly_what_cassandra_would_return(stack: Endpoints) -> None:
    """`python -m cdc_synth.demo` exits 0 after both parts: the CQL writes the stack's Debezium
    agent captured are applied and a checksum job per table finds as many rows on both sides
    and no difference; the 30,000 synthetic Avro events (partial updates, nulls, row /
    partition / range deletes, TTLs) leave exactly the rows a Cassandra SELECT would return."""
    done = demo(stack.values)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    captured: dict[str, Any] = summary["captured"]
    assert set(captured["checksum"]) == {"cdc_users", "cdc_orders", "cdc_sessions"}
    for table, job in captured["checksum"].items():
        assert job["mismatches"] == 0, table
        assert job["cassandra_rows"] == job["postgres_rows"] > 0, table
    assert captured["events_applied"] == captured["events_captured"]
    assert captured["events_captured"] >= captured["statements_written"] > 500
    assert captured["dead_letters"] == 0
    assert "real pipeline" in done.stdout.split("synthetic")[0]  # the real part runs first
    assert summary["rows"] == summary["expected_rows"]
    assert len(summary["rows"]) == 3
    assert summary["events_applied"] == 30_000
    assert summary["dead_letters"] == 0


def test_demo_without_a_debezium_agent_fails_clearly(stack: Endpoints) -> None:
    """On a stack that runs no Debezium agent, the real part stops the demo with exit 1 and
    says so, rather than waiting for events that never come."""
    done = demo(stack.values, "--mode", "captured", unset="CDC_STACK_DEBEZIUM_TOPIC_PREFIX")
    assert done.returncode == 1, done.stdout[-3000:]
    assert "runs no Debezium agent" in done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {}
