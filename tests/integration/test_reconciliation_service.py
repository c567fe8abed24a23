"""Reconciliation as a service on the real stack: schedulers racing, interrupted jobs, HTTP
routes, the CLI, and the metrics pushed to the Pushgateway."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cdc_recon.alerting import ReconMetrics
from cdc_recon.api import reconciliation_routes
from cdc_recon.repository import job_lock
from cdc_recon.runtime import ReconciliationRuntime
from cdc_recon.scheduler import Scheduler
from cdc_recon.service import Reconciler
from cdc_sink.app import load_settings
from cdc_sink.apply.writer import prepare_connection
from cdc_sink.config import ApiConfig
from cdc_sink.ops.audit import cli_actor
from cdc_sink.ops.auth import Authenticator
from cdc_sink.ops.http import Listener, new_app
from tests.support import recon_data as data
from tests.support.names import Unique
from tests.support.pipeline import run_cli, sql
from tests.support.recon_data import Setup, make_setup
from tests.support.stack import Endpoints


@pytest.fixture
async def setup(stack: Endpoints, unique: Unique) -> AsyncIterator[Setup]:
    async for made in make_setup(stack, unique, 60, stack.pushgateway_url, buckets=16):
        yield made


def env_for(stack: Endpoints, setup: Setup, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in stack.values.items() if k.startswith("CDC_") and "__" in k}
    env["CDC_POSTGRES__SCHEMA"] = setup.schema
    env.update({f"CDC_{k.upper()}": v for k, v in settings.items()})
    return env


async def runtime_for(env: dict[str, str], owner: str) -> ReconciliationRuntime:
    """What a sink pod hosts: its own pool and Cassandra session."""
    config = load_settings(env)
    pool = await asyncpg.create_pool(
        config.postgres.dsn.reveal(),
        min_size=1,
        max_size=4,
        server_settings={"search_path": config.postgres.schema},
        init=prepare_connection,
    )
    assert pool is not None
    return ReconciliationRuntime(config, pool, CollectorRegistry(), owner)


async def close(runtime: ReconciliationRuntime) -> None:
    await runtime.close()
    await runtime.pool.close()


async def test_two_schedulers_racing_run_a_due_job_once(stack: Endpoints, setup: Setup) -> None:
    """Two pods ticking at the same moment create and run the scheduled job exactly once, and
    neither runs it again before its interval has passed; a pending job is claimed once."""
    env = env_for(
        stack, setup, reconciliation__schedule="everything:row_count@3600", pushgateway__url=""
    )
    pods = [await runtime_for(env, f"pod-{i}") for i in range(2)]
    try:
        schedulers = [Scheduler(pod.reconciler, pod.settings) for pod in pods]
        first = await asyncio.gather(*(s.tick() for s in schedulers))
        assert sorted(len(ran) for ran in first) == [0, 1]
        again = await asyncio.gather(*(s.tick() for s in schedulers))
        assert again == [[], []]
        jobs = await setup.reconciler.repository.jobs(table=data.TARGET)
        assert [(j["strategy"], j["status"], j["trigger"]) for j in jobs] == [
            ("row_count", "succeeded", "schedule")
        ]
        job = await setup.reconciler.submit(data.TARGET, "row_count")
        engines = [await pod.reconciler() for pod in pods]
        assert sorted(await asyncio.gather(*(e.execute(job) for e in engines))) == [False, True]
        assert (await setup.reconciler.repository.job(job) or {})["status"] == "succeeded"
    finally:
        for pod in pods:
            await close(pod)


async def test_the_jobs_of_one_worker_take_turns(stack: Endpoints, setup: Setup) -> None:
    """Jobs started together in one worker run one at a time (MAX_RUNNING_JOBS, default 1):
    their running spans do not overlap, and each succeeds; with a limit of 3 they all run."""
    for limit, expect_turns in (("1", True), ("3", False)):
        env = env_for(stack, setup, reconciliation__max_running_jobs=limit, pushgateway__url="")
        pod = await runtime_for(env, f"pod-{limit}")
        try:
            engine = await pod.reconciler()
            jobs = [await engine.submit(data.TARGET, "checksum") for _ in range(3)]
            assert await asyncio.gather(*(engine.execute(job) for job in jobs)) == [True] * 3
            records = [await engine.repository.job(job) or {} for job in jobs]
            assert {r["status"] for r in records} == {"succeeded"}
            spans = sorted((r["started_at"], r["finished_at"]) for r in records)
            if expect_turns:
                assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
        finally:
            await close(pod)


async def test_a_job_whose_runner_died_is_marked_interrupted(
    stack: Endpoints, setup: Setup
) -> None:
    """A running job stays 'running' while its runner's session lives and becomes
    'interrupted' once that session is gone (the process died)."""
    repository = setup.reconciler.repository
    job = await repository.create_job(data.TARGET, "checksum")
    runner = await asyncpg.connect(
        stack.postgres_dsn, server_settings={"search_path": setup.schema}
    )
    assert await runner.fetchval("SELECT pg_try_advisory_lock($1)", job_lock(setup.schema, job))
    assert await repository.claim(job, "doomed-pod")
    assert not await repository.claim(job, "other-pod")
    assert await repository.mark_interrupted() == []
    await runner.close()  # the pod is killed: PostgreSQL drops its session and its locks
    assert await repository.mark_interrupted() == [job]
    record = await repository.job(job)
    assert record is not None
    assert record["status"] == "interrupted"
    assert "stopped" in record["error"]
    assert not await setup.reconciler.execute(job)  # an ended job is never run again


async def test_a_cancelled_job_is_marked_interrupted(setup: Setup) -> None:
    """A job cancelled mid-run (the process is stopping) ends as 'interrupted', not 'running'."""
    rec = setup.reconciler
    job = await rec.submit(data.TARGET, "row_count")
    started = asyncio.Event()
    original = rec.cassandra.count

    async def slow_count(*args: Any, **kwargs: Any) -> Any:
        started.set()
        await asyncio.sleep(60)  # a long scan
        return await original(*args, **kwargs)

    rec.cassandra.count = slow_count  # type: ignore[method-assign]
    task = asyncio.create_task(rec.execute(job))
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await rec.repository.job(job)
    assert record is not None
    assert record["status"] == "interrupted"


async def test_a_job_is_recorded_without_reading_cassandra(stack: Endpoints, setup: Setup) -> None:
    """A job request is checked against PostgreSQL alone, so jobs waiting for their turn cost
    Cassandra nothing: recording one sends Cassandra no request, running it does."""
    async with data.reconciler_on(stack, setup.schema) as rec:
        requests: list[str] = []
        rec.session.add_request_init_listener(lambda future: requests.append(str(future.query)))
        job = await rec.submit(data.TARGET, "row_count")
        recorded = await rec.repository.job(job)
        assert recorded is not None
        assert recorded["status"] == "pending"
        assert requests == []
        assert await rec.execute(job)
        ran = await rec.repository.job(job)
        assert ran is not None
        assert ran["status"] == "succeeded", ran
        assert requests


async def test_a_job_whose_cassandra_table_is_gone_fails_when_it_runs(
    stack: Endpoints, setup: Setup
) -> None:
    """A target whose Cassandra table no longer exists is still accepted (the request reads
    PostgreSQL alone), and the job fails when it runs, naming the missing table."""
    ghost = "cdc_ghost"
    await sql(stack.postgres_dsn, setup.schema, f"CREATE TABLE {ghost} (LIKE {data.TARGET})")
    await sql(
        stack.postgres_dsn,
        setup.schema,
        "INSERT INTO _cdc_schema_metadata (target_table, version, keyspace_name, source_table, "
        "key_columns, columns) SELECT $1, 1, $2, 'ghost', key_columns, columns "
        "FROM _cdc_schema_metadata WHERE target_table = $3 ORDER BY version DESC LIMIT 1",
        ghost,
        setup.keyspace,
        data.TARGET,
    )
    async with data.reconciler_on(stack, setup.schema) as rec:
        job = await rec.submit(ghost, "row_count")
        assert await rec.execute(job)
        ended = await rec.repository.job(job)
        assert ended is not None
        assert ended["status"] == "failed"
        assert f"Cassandra has no table {setup.keyspace}.ghost" in ended["error"], ended


async def test_jobs_read_within_the_row_budget(stack: Endpoints, setup: Setup) -> None:
    """With MAX_ROWS_PER_SECOND at 10, a checksum job over 60 rows is held back on both sides
    (a second's worth is free, the rest waits) and still finds the tables equal; with 0 it is
    never held back."""
    for budget in (10, 0):
        async with data.reconciler_on(
            stack, setup.schema, max_rows_per_second=budget, buckets=16
        ) as rec:
            job = await rec.run(data.TARGET, "checksum")
            assert job["status"] == "succeeded", job
            assert job["mismatches"] == 0, job
            waited = (rec.cassandra.pacer.waited, rec.postgres.pacer.waited)
            print(
                f"budget {budget} rows/s: held back {waited[0]:.1f} s (Cassandra), "
                f"{waited[1]:.1f} s (PostgreSQL)"
            )
            if budget:
                assert min(waited) > 0, waited
            else:
                assert waited == (0, 0)


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data_bytes = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    request = urllib.request.Request(url, data=data_bytes, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_http_routes(stack: Endpoints, setup: Setup) -> None:
    """Jobs are created, listed and read over HTTP; mismatches filtered and resolved; bad
    requests get clear 4xx answers."""
    setup.session.execute(
        f"UPDATE {setup.keyspace}.{data.TABLE} USING TIMESTAMP {data.TS0 + 10**7} "
        "SET t_ascii = 'changed' WHERE id = %s AND region = %s AND seq = %s",
        list(setup.rows[5].key.values()),
    )
    runtime = await runtime_for(env_for(stack, setup, pushgateway__url=""), "http-pod")
    app = new_app("reconciliation", ApiConfig(max_body_bytes=1_048_576))
    app.include_router(reconciliation_routes(runtime, Authenticator(ApiConfig(), None)))
    server = Listener(app, name="api")
    await server.start("127.0.0.1", 0, "CDC_API__PORT")
    base = f"http://127.0.0.1:{server.port}/reconciliation"

    async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await asyncio.to_thread(_http, method, base + path, body)

    try:
        status, job = await call("POST", "/jobs", {"table": data.TARGET, "strategy": "checksum"})
        assert status == 202
        assert job["status"] in ("pending", "running", "succeeded")
        for _ in range(300):
            status, job = await call("GET", f"/jobs/{job['id']}")
            if job["status"] not in ("pending", "running"):
                break
            await asyncio.sleep(0.2)
        assert (status, job["status"], job["mismatches"]) == (200, "succeeded", 1)
        status, listed = await call("GET", f"/jobs?table={data.TARGET}&strategy=checksum")
        assert [j["id"] for j in listed["jobs"]] == [job["id"]]
        status, found = await call("GET", f"/mismatches?job={job['id']}&kind=value_mismatch")
        assert [(m["kind"], m["columns"]) for m in found["mismatches"]] == [
            ("value_mismatch", ["t_ascii"])
        ]
        assert (await call("GET", f"/mismatches?job={job['id']}&kind=extra_in_postgres"))[1] == {
            "mismatches": []
        }
        mismatch = found["mismatches"][0]["id"]
        status, resolved = await call(
            "POST", f"/mismatches/{mismatch}/resolve", {"resolution": "known: backfill pending"}
        )
        assert (status, resolved["status"], resolved["resolution"]) == (
            200,
            "resolved",
            "known: backfill pending",
        )
        status, open_ = await call("GET", f"/mismatches?table={data.TARGET}&status=open")
        assert open_["mismatches"] == []
        audit = await sql(
            stack.postgres_dsn,
            setup.schema,
            "SELECT actor, action, details FROM _cdc_audit_log ORDER BY id",
        )
        assert [(a["actor"], a["action"], json.loads(a["details"])) for a in audit] == [
            (
                "anonymous",
                "reconciliation_job",
                {"job": job["id"], "table": data.TARGET, "strategy": "checksum"},
            ),
            (
                "anonymous",
                "mismatch_resolution",
                {
                    "mismatch": mismatch,
                    "resolution": "known: backfill pending",
                    "status": "resolved",
                },
            ),
        ]

        errors = [
            (await call("POST", "/jobs", {"table": "nope", "strategy": "checksum"}), 404, "nope"),
            (await call("POST", "/jobs", {"table": data.TARGET, "strategy": "md5"}), 400, "md5"),
            (await call("POST", "/jobs", {"table": data.TARGET}), 400, "strategy"),
            (await call("POST", "/jobs", b"{not json"), 400, "JSON"),
            (
                await call(
                    "POST", "/jobs", {"table": data.TARGET, "strategy": "row_count", "x": 1}
                ),
                400,
                "x",
            ),
            (await call("GET", "/jobs/999999999"), 404, "999999999"),
            (await call("GET", "/jobs/abc"), 400, "abc"),
            (await call("GET", f"/jobs/{2**64}"), 400, "id must be between"),
            (await call("GET", "/jobs?limit=-1"), 400, "limit must be between 1 and 10000"),
            (await call("GET", "/mismatches?limit=10001"), 400, "limit"),
            (await call("GET", "/mismatches?job=1.5"), 400, "job must be a whole number"),
            (await call("GET", "/mismatches?kind=bogus"), 400, "kind"),
            (await call("POST", "/mismatches/999999999/resolve", {"resolution": "x"}), 404, ""),
            (await call("POST", f"/mismatches/{mismatch}/resolve", {}), 400, "resolution"),
        ]
        for (status, body), expected, word in errors:
            assert status == expected, body
            assert word in body["error"]
    finally:
        await server.stop()
        await close(runtime)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli({**env, "CDC_LOG__LEVEL": "warning"}, "reconcile", *args)


async def test_cli_run_and_repair(stack: Endpoints, setup: Setup) -> None:
    """`reconcile run` prints a summary and exits 0; `reconcile repair` fixes the job's
    mismatches; unknown tables, strategies and jobs exit 2 with a message naming them."""
    env = env_for(stack, setup, pushgateway__url="")
    setup.session.execute(
        f"DELETE FROM {setup.keyspace}.{data.TABLE} USING TIMESTAMP {data.TS0 + 10**7} "
        "WHERE id = %s AND region = %s AND seq = %s",
        list(setup.rows[3].key.values()),
    )
    run = await asyncio.to_thread(
        _cli, env, "run", "--table", data.TARGET, "--strategy", "checksum"
    )
    assert run.returncode == 0, run.stderr
    assert "checksum of cdc_everything: succeeded" in run.stdout
    assert "mismatches 1" in run.stdout
    job_id = int(run.stdout.split()[1].rstrip(":"))
    repair = await asyncio.to_thread(_cli, env, "repair", "--job", str(job_id))
    assert repair.returncode == 0, repair.stderr
    assert "repaired 1" in repair.stdout
    sample = await asyncio.to_thread(
        _cli, env, "run", "--table", "everything", "--strategy", "sample", "--sample-size", "20"
    )
    assert sample.returncode == 0, sample.stderr
    assert "mismatches 0" in sample.stdout
    audit = await sql(
        stack.postgres_dsn,
        setup.schema,
        "SELECT actor, action, details, request_id FROM _cdc_audit_log ORDER BY id",
    )
    assert [(a["actor"], a["action"]) for a in audit] == [
        (cli_actor(), "reconciliation_job"),
        (cli_actor(), "reconciliation_repair"),
        (cli_actor(), "reconciliation_job"),
    ]
    first, repaired, _ = (json.loads(a["details"]) for a in audit)
    assert first == {"job": job_id, "table": data.TARGET, "strategy": "checksum"}
    assert (repaired["job_id"], repaired["repaired"]) == (job_id, 1)
    assert len({a["request_id"] for a in audit}) == 3  # one per command

    for args, word in (
        (("run", "--table", "missing_table", "--strategy", "checksum"), "missing_table"),
        (("run", "--table", data.TARGET, "--strategy", "md5"), "md5"),
        (("repair", "--job", "999999999"), "999999999"),
        (
            ("run", "--table", data.TARGET, "--strategy", "timestamp_range", "--window-start", "x"),
            "ISO 8601",
        ),
    ):
        failed = await asyncio.to_thread(_cli, env, *args)
        assert failed.returncode == 2, (args, failed.stdout, failed.stderr)
        assert word in failed.stderr


def _text_of(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _pushed(url: str, name: str) -> dict[str, float]:
    """Samples of `name` on the Pushgateway whose table label is cdc_everything, by strategy."""
    text = _text_of(f"{url}/metrics")
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'table="{data.TARGET}"' in line:
            labels, value = line.rsplit(" ", 1)
            strategy = labels.split('strategy="')[1].split('"')[0]
            if 'job="cdc_reconciliation"' in labels:
                found[strategy] = float(value)
    return found


async def test_metrics_are_pushed_and_exposed(stack: Endpoints, setup: Setup) -> None:
    """After a job the Pushgateway holds its drift and outcome gauges; an unreachable
    Pushgateway does not fail the job (it is counted); the registry exposes the same names."""
    began = time.time()
    setup.session.execute(
        f"DELETE FROM {setup.keyspace}.{data.TABLE} USING TIMESTAMP {data.TS0 + 10**7} "
        "WHERE id = %s AND region = %s AND seq = %s",
        list(setup.rows[7].key.values()),
    )
    job = await setup.reconciler.run(data.TARGET, "row_count")
    assert job["status"] == "succeeded"
    url = stack.pushgateway_url
    drift = await asyncio.to_thread(_pushed, url, "cdc_reconciliation_drift_percentage")
    assert drift["row_count"] == pytest.approx(1 / 59 * 100)
    ended = await asyncio.to_thread(_pushed, url, "cdc_reconciliation_last_job_timestamp_seconds")
    assert ended["row_count"] >= began - 1
    failed = await asyncio.to_thread(_pushed, url, "cdc_reconciliation_last_job_failed")
    assert failed["row_count"] == 0

    metrics = ReconMetrics()
    offline = Reconciler(
        setup.pool,
        setup.schema,
        setup.reconciler.session,
        setup.reconciler.settings,
        metrics=metrics,
        pushgateway_url="http://127.0.0.1:9",
        owner="offline",
    )
    job = await offline.run(data.TARGET, "row_count")
    assert job["status"] == "succeeded"
    exposed = generate_latest(metrics.registry).decode()
    assert "cdc_reconciliation_push_failures_total 1.0" in exposed
    for name in (
        "cdc_reconciliation_drift_percentage",
        "cdc_reconciliation_mismatches",
        "cdc_reconciliation_last_job_failed",
        "cdc_reconciliation_last_job_timestamp_seconds",
        "cdc_reconciliation_last_job_duration_seconds",
    ):
        assert f'{name}{{strategy="row_count",table="{data.TARGET}"}}' in exposed
    assert (
        f'cdc_reconciliation_jobs_total{{status="succeeded",strategy="row_count",'
        f'table="{data.TARGET}"}} 1.0' in exposed
    )


async def test_the_worker_runs_scheduled_jobs_and_serves_them(
    stack: Endpoints, unique: Unique
) -> None:
    """A sink worker with reconciliation enabled streams Debezium events into PostgreSQL,
    runs the scheduled checksum against Cassandra (zero drift), and serves the job on
    /reconciliation/jobs and its gauges on /metrics."""
    from cdc_sink.app import SinkApp
    from tests.support.cassandra_model import ALL_KEYS
    from tests.support.cassandra_model import Mutation as Write
    from tests.support.pipeline import (
        create_cassandra_model_table,
        create_topic,
        produce,
        schemaless_record,
        sink_env,
    )

    keyspace, schema = unique.keyspace("ks"), unique.schema("recon")
    topic = unique("cdc-events-recon")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    writes = [
        Write("insert", 1_700_000_000_000_000 + i, key, {"v1": (i, None), "v2": (f"s{i}", None)})
        for i, key in enumerate(ALL_KEYS)
    ]
    session = data.cassandra_session(stack)
    for w in writes:
        session.execute(
            f"INSERT INTO {keyspace}.model (p1, p2, c1, c2, v1, v2) "
            f"VALUES (%s, %s, %s, %s, %s, %s) USING TIMESTAMP {w.ts}",
            [*w.key, w.cells["v1"][0], w.cells["v2"][0]],
        )
    await produce(stack.kafka, topic, [schemaless_record(w, keyspace) for w in writes])
    env = sink_env(
        stack,
        topic=topic,
        group=unique("g"),
        schema=schema,
        http__host="127.0.0.1",
        reconciliation__enabled="true",
        reconciliation__schedule="model:checksum@3600",
        reconciliation__poll_seconds="0.5",
        pushgateway__url="",
    )
    worker = SinkApp(load_settings(env))
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(120):
            while True:
                await asyncio.sleep(0.5)
                if worker.http is None:
                    continue
                url = f"http://127.0.0.1:{worker.http.port}"
                status, body = await asyncio.to_thread(
                    _http, "GET", f"{url}/reconciliation/jobs?status=succeeded"
                )
                if status == 200 and body["jobs"]:
                    break
        (job,) = body["jobs"]
        assert (job["target_table"], job["strategy"], job["trigger"]) == (
            "cdc_model",
            "checksum",
            "schedule",
        )
        assert (job["cassandra_rows"], job["postgres_rows"], job["mismatches"]) == (24, 24, 0)
        assert worker.probes is not None
        metrics = await asyncio.to_thread(
            _text_of, f"http://127.0.0.1:{worker.probes.port}/metrics"
        )
        assert (
            'cdc_reconciliation_drift_percentage{strategy="checksum",table="cdc_model"} 0.0'
            in metrics
        )
        assert 'cdc_reconciliation_last_job_failed{strategy="checksum",table="cdc_model"} 0.0' in (
            metrics
        )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
        session.cluster.shutdown()
