"""The README's main job: the demo streams Avro change events through the sink, exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.stack import REPO, Endpoints


def test_demo_lands_exactly_what_cassandra_would_return(stack: Endpoints) -> None:
    """`python -m cdc_synth.demo` (30,000 Avro events for users / orders / sessions, with
    partial updates, nulls, row / partition / range deletes and TTLs) exits 0, which it only
    does when every table holds exactly the rows a Cassandra SELECT would return."""
    env = {**os.environ, **stack.values, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "cdc_synth.demo", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["rows"] == summary["expected_rows"]
    assert len(summary["rows"]) == 3
    assert summary["events_applied"] == 30_000
    assert summary["dead_letters"] == 0
