"""The Grafana dashboards and the reconciliation alerts against a real stream: two worker
processes (each with its own metrics port, PostgreSQL logins leased from Vault) apply a stream
from Kafka, reconciliation jobs run on each of them, and the stack's Prometheus scrapes both
workers (registered in its targets directory, their series labelled with this run's name)
besides the stack's Pushgateway, Debezium agent and cdc_raw exporter, and evaluates the rules."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cassandra.concurrent import execute_concurrent_with_args
from prometheus_client import delete_from_gateway

from tests.support.cassandra_model import Mutation
from tests.support.dashboards import DASHBOARDS, panel_queries, variable_queries
from tests.support.names import Unique
from tests.support.pipeline import (
    MODEL_CQL,
    cassandra_session,
    create_cassandra_table,
    create_topic,
    fetch_value,
    kill,
    produce_placed,
    schemaless_record,
    sink_env,
    start_worker_process,
)
from tests.support.prometheus import (
    STACK_SCRAPE_SECONDS,
    Prometheus,
    capture_jobs,
    free_port,
    registered_workers,
)
from tests.support.stack import Endpoints
from tests.support.topics import unique_name
from tests.support.vault import leased_postgres

TS = 1_700_000_000_000_000
GOOD_PARTITIONS = 7  # partitions 0-6 carry the stream; 7 only poison, which pauses it
WARM_UP, MEASURED, POISON = 140, 1400, 6
WAIT_SECONDS = 120
THROUGHPUT_WINDOW = 30
# What each Grafana variable stands for here: every table; the workers' scrape job ($instance:
# this test's workers, the scene's).
VARIABLES = {
    "$job": "cdc-sink",
    "$table": ".*",
    "$strategy": ".*",
    "$agent": ".*",
}


@dataclass
class Scene:
    stack: Endpoints
    prometheus: Prometheus
    apis: list[str]  # each worker's control API, http://127.0.0.1:port
    instances: list[str]  # each worker's probes and metrics listener, 127.0.0.1:port
    keyspace: str
    table: str  # the Cassandra table; its target is cdc_<table>
    dsn: str
    schema: str
    measured_from: float  # unix time just before the measured part of the stream was produced
    measured_until: float  # unix time once both workers had applied it and been scraped
    keys: list[tuple[Any, ...]]


def _write(i: int) -> Mutation:
    cells = {"v1": (i, None), "v2": (f"s{i}", None), "v3": (i % 7, None)}
    return Mutation("insert", TS + i, (i % 13, "p", i, "x"), cells)


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _until(what: str, check: Any) -> Any:
    """Poll check() (sync; run in a thread) until it returns something true; return that."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        got = await asyncio.to_thread(check)
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)


async def _stream(stack: Endpoints, topic: str, keyspace: str, table: str, writes: range) -> None:
    """Write rows to Cassandra and produce their change events to the good partitions."""
    session = cassandra_session(stack)
    try:
        statement = session.prepare(
            f"INSERT INTO {keyspace}.{table} (p1, p2, c1, c2, v1, v2, v3) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        mutations = [_write(i) for i in writes]
        rows = [(*m.key, *(m.cells[c][0] for c in ("v1", "v2", "v3")), m.ts) for m in mutations]
        await asyncio.to_thread(execute_concurrent_with_args, session, statement, rows)
    finally:
        session.cluster.shutdown()
    await produce_placed(
        stack.kafka,
        topic,
        [
            (i % GOOD_PARTITIONS, *schemaless_record(m, keyspace, table))
            for i, m in zip(writes, mutations, strict=True)
        ],
    )


async def _rows(dsn: str, schema: str, target: str) -> int:
    return int(await fetch_value(dsn, f'SELECT count(*) FROM "{schema}"."{target}"'))


@pytest.fixture(scope="module")
async def scene(stack: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scene]:
    """Two workers that have applied a stream (a warm-up, then a measured part), a dead
    letter, a poisoned partition they paused, and a Prometheus that has scraped them
    throughout."""
    names = Unique(stack)
    directory = tmp_path_factory.mktemp("dashboards")
    keyspace, table, topic = names.keyspace("dash"), unique_name("flow"), names("cdc-events-dash")
    create_cassandra_table(
        stack, keyspace, MODEL_CQL.format(ks=keyspace).replace(".model (", f".{table} (")
    )
    await create_topic(stack.kafka, topic)
    ports = [free_port(), free_port()]
    api_ports = [free_port(), free_port()]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        async with leased_postgres(stack, unique_name, ttl_s=600, max_ttl_s=3600) as leased:
            for index, port in enumerate(ports):
                env = sink_env(
                    stack,
                    topic=topic,
                    group=f"{topic}-group",  # one consumer group for both
                    schema=leased.schema,
                    http__host="127.0.0.1",
                    http__port=str(port),
                    api__port=str(api_ports[index]),
                    dlq__topic=names("dlq-dash"),
                    dlq__window_records="20",
                    pushgateway__url=stack.pushgateway_url,
                    sink__linger_ms="20",
                )
                env.update(leased.settings)
                workers.append(
                    start_worker_process(
                        env, directory / f"worker-{index}.log", stop_when_caught_up=False
                    )
                )
            apis = [f"http://127.0.0.1:{port}" for port in api_ports]
            capture_jobs(stack)  # the capture panels need the stack's agent and exporter
            run = names("dash")
            instances = [f"127.0.0.1:{port}" for port in ports]
            with registered_workers(stack, run, instances, {"run": run}) as prometheus:
                await asyncio.to_thread(
                    prometheus.wait_scraped, 2, WAIT_SECONDS, matchers=f', run="{run}"'
                )
                # Both own partitions before anything is produced, so each one's counters
                # exist before the measured part (rate() cannot see a series' first sample).
                owning = f'cdc_assigned_partitions{{job="cdc-sink", run="{run}"}} > 0'
                await _until(
                    "both workers to own partitions",
                    lambda: len(prometheus.query(owning)) == 2,
                )
                target = f"cdc_{table}"
                await _stream(stack, topic, keyspace, table, range(WARM_UP))
                # One poison record among partition 0's twenty is dead-lettered; partition 7,
                # nothing but poison, passes the dead-letter limit and is paused.
                poison = [(GOOD_PARTITIONS, b"k", b"not json at all") for _ in range(POISON)]
                await produce_placed(stack.kafka, topic, [(0, b"k", b"not json"), *poison])
                dsn = stack["CDC_STACK_POSTGRES_ADMIN_DSN"]
                await _wait_rows(dsn, leased.schema, target, WARM_UP)
                await _until(
                    "Prometheus to see the warm-up applied",
                    lambda: _applied_seen(prometheus, target) >= WARM_UP,
                )
                # A few scrapes of the flat counters: the measured window starts on them.
                await asyncio.sleep(3 * STACK_SCRAPE_SECONDS)
                measured_from = time.time()
                await _stream(stack, topic, keyspace, table, range(WARM_UP, WARM_UP + MEASURED))
                await _wait_rows(dsn, leased.schema, target, WARM_UP + MEASURED)
                await _until(
                    "Prometheus to see the measured part applied",
                    lambda: _applied_seen(prometheus, target) >= WARM_UP + MEASURED,
                )
                await asyncio.sleep(2 * STACK_SCRAPE_SECONDS)
                yield Scene(
                    stack,
                    prometheus,
                    apis,
                    instances,
                    keyspace,
                    table,
                    dsn,
                    leased.schema,
                    measured_from,
                    time.time(),
                    [_write(i).key for i in range(WARM_UP + MEASURED)],
                )
                for worker in workers:
                    worker.terminate()
                for worker in workers:
                    await asyncio.to_thread(worker.wait, 60)
    finally:
        for worker in workers:
            kill(worker)
        for strategy in ("row_count", "checksum"):
            delete_from_gateway(
                stack.pushgateway_url,
                job="cdc_reconciliation",
                grouping_key={"table": f"cdc_{table}", "strategy": strategy},
            )
        await names.drop()


async def _wait_rows(dsn: str, schema: str, target: str, count: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        exists = await fetch_value(
            dsn, "SELECT to_regclass($1) IS NOT NULL", f'"{schema}"."{target}"'
        )
        if exists and await _rows(dsn, schema, target) >= count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{target} did not reach {count} rows")
        await asyncio.sleep(0.2)


def _applied_seen(prometheus: Prometheus, target: str) -> float:
    found = prometheus.query(f'sum(cdc_events_processed_total{{table="{target}"}})')
    return float(found[0]["value"][1]) if found else 0.0


def _substitute(expression: str, rate_interval: str, scene: Scene) -> str:
    """`expression` with the dashboard's variables standing for this test's workers."""
    instances = "|".join(scene.instances)
    for name, value in {
        **VARIABLES,
        "$instance": instances,
        "$__rate_interval": rate_interval,
    }.items():
        expression = expression.replace(name, value)
    assert "$" not in expression, f"a variable is left in {expression}"
    return expression


async def _run_job(api: str, target: str, strategy: str) -> dict[str, Any]:
    status, job = await asyncio.to_thread(
        _http, "POST", f"{api}/reconciliation/jobs", {"table": target, "strategy": strategy}
    )
    assert status == 202, job

    def ended() -> dict[str, Any] | None:
        _, now = _http("GET", f"{api}/reconciliation/jobs/{job['id']}")
        return None if now["status"] in ("pending", "running") else now

    done: dict[str, Any] = await _until(f"job {job['id']}", ended)
    assert done["status"] == "succeeded", done
    return done


def _drift_alerts(prometheus: Prometheus, target: str) -> list[dict[str, Any]]:
    return [
        alert
        for alert in prometheus.alerts("ReconciliationDriftCritical")
        if alert["labels"].get("table") == target
    ]


async def test_drift_alert_clears_when_another_worker_finds_none(scene: Scene) -> None:
    """Worker 1's job finds 10 % drift and ReconciliationDriftCritical goes active; once the
    rows are back, worker 2's job finds none and the alert clears, although worker 1 still
    exports the drift of its own job (which the rule does not read)."""
    target = f"cdc_{scene.table}"
    missing = scene.keys[: len(scene.keys) // 10]
    session = cassandra_session(scene.stack)
    try:
        delete = session.prepare(
            f"DELETE FROM {scene.keyspace}.{scene.table} USING TIMESTAMP {TS + 10**9} "
            "WHERE p1 = ? AND p2 = ? AND c1 = ? AND c2 = ?"
        )
        await asyncio.to_thread(execute_concurrent_with_args, session, delete, missing)
        found = await _run_job(scene.apis[0], target, "row_count")
        assert float(found["drift_percentage"]) > 5, found
        await _until(
            "ReconciliationDriftCritical to go active",
            lambda: _drift_alerts(scene.prometheus, target),
        )
        alert = _drift_alerts(scene.prometheus, target)[0]
        assert alert["labels"]["job"] == "cdc_reconciliation"
        assert alert["state"] in ("pending", "firing")

        restore = session.prepare(
            f"INSERT INTO {scene.keyspace}.{scene.table} (p1, p2, c1, c2) "
            f"VALUES (?, ?, ?, ?) USING TIMESTAMP {TS + 2 * 10**9}"
        )
        await asyncio.to_thread(execute_concurrent_with_args, session, restore, missing)
    finally:
        session.cluster.shutdown()
    repaired = await _run_job(scene.apis[1], target, "row_count")
    assert float(repaired["drift_percentage"]) == 0, repaired
    await _until(
        "ReconciliationDriftCritical to clear",
        lambda: not _drift_alerts(scene.prometheus, target),
    )
    # Worker 1 still exports its own job's drift: a rule on those series would still fire.
    stale = scene.prometheus.query(
        f'cdc_reconciliation_drift_percentage{{job="cdc-sink", table="{target}"}} > 5'
    )
    assert [series["metric"]["instance"] for series in stale] == [scene.instances[0]]


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda path: path.stem)
async def test_every_panel_query_returns_series(scene: Scene, dashboard: Path) -> None:
    """Each panel's PromQL, its variables substituted, returns at least one series from the
    Prometheus that scraped the two workers and the Pushgateway, and each variable's query
    offers at least one value."""
    if "reconciliation" in dashboard.stem:
        # The reconciliation panels need a job of this stream's table on the Pushgateway.
        await _run_job(scene.apis[0], f"cdc_{scene.table}", "checksum")
        await _until(
            "the pushed job to be scraped",
            lambda: scene.prometheus.query(
                'cdc_reconciliation_last_success_timestamp_seconds{job="cdc_reconciliation",'
                f'table="cdc_{scene.table}"}}'
            ),
        )
    measured: dict[str, int] = {}
    for label, match in variable_queries(dashboard):
        values = scene.prometheus.label_values(label, _substitute(match, "1m", scene))
        assert values, f"variable {label}: {match} offers no value"
    empty = []
    for title, expression in panel_queries(dashboard):
        found = scene.prometheus.query(_substitute(expression, "1m", scene))
        measured[title] = measured.get(title, 0) + len(found)
        if not found:
            empty.append(f"{title}: {expression}")
    print(f"{dashboard.stem}: series per panel {measured}")
    assert not empty, "panels without a series:\n" + "\n".join(empty)


async def test_throughput_panel_agrees_with_the_events_applied(scene: Scene) -> None:
    """Over a window holding the measured part of the stream, the workers' counters rose by
    exactly the events applied then, and the throughput panel's rate times the window agrees
    with it within Prometheus's extrapolation to the window's edges (two scrape intervals of
    the window); all of them are inserts of the stream's table."""
    (pipeline,) = (path for path in DASHBOARDS if "pipeline" in path.stem)
    (expression,) = (
        expr for title, expr in panel_queries(pipeline) if title.startswith("Throughput")
    )
    assert re.search(r"rate\(cdc_events_processed_total\{", expression)
    # The counters are flat before and after the measured part: a window of at least 30 s
    # keeps the extrapolation small.
    # The window opens two scrapes before the measured part: rate() only sees the increase
    # after the window's first sample, which must still be the flat warm-up count.
    lead = 2 * STACK_SCRAPE_SECONDS
    span = scene.measured_until - scene.measured_from + lead
    window = max(THROUGHPUT_WINDOW, math.ceil(span) + 1)
    at = scene.measured_from - lead + window
    await asyncio.sleep(max(0.0, at + 2 * STACK_SCRAPE_SECONDS - time.time()))
    target = f"cdc_{scene.table}"
    applied = await _rows(scene.dsn, scene.schema, target) - WARM_UP
    assert applied == MEASURED
    counter = f'cdc_events_processed_total{{table="{target}"}}'
    (rose,) = scene.prometheus.query(f"sum({counter}) - sum({counter} offset {window}s)", at=at)
    assert float(rose["value"][1]) == applied
    found = scene.prometheus.query(_substitute(expression, f"{window}s", scene), at=at)
    by_series = {(s["metric"]["table"], s["metric"]["op"]): float(s["value"][1]) for s in found}
    assert set(by_series) == {(target, "insert")}, by_series
    counted = by_series[(target, "insert")] * window
    print(f"throughput panel: {counted:.1f} events in a {window} s window; applied: {applied}")
    assert applied <= counted <= applied * window / (window - 2 * STACK_SCRAPE_SECONDS)
