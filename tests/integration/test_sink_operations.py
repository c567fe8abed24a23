"""Operating the worker: TTL expiry, its HTTP API, migrations, shutdown and bad settings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdc_sink.app import SinkApp
from cdc_sink.config import load_config
from cdc_sink.errors import FatalError
from tests.support.cassandra_model import Mutation
from tests.support.names import Unique
from tests.support.pipeline import (
    applied,
    create_cassandra_model_table,
    create_topic,
    http_get,
    produce,
    produce_positions,
    read_rows,
    run_cli,
    run_worker,
    schemaless_record,
    sink_env,
)
from tests.support.recon_data import cassandra_session
from tests.support.stack import REPO, Endpoints


async def test_ttl_rows_expire_and_the_http_api_reports(stack: Endpoints, unique: Unique) -> None:
    """A row inserted with a TTL disappears once it expires, without any further event, while
    /health, /ready and /metrics report on the running worker."""
    keyspace, topic, schema = unique.keyspace("ks"), unique("cdc-events-ttl"), unique.schema("ttl")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    now = time.time_ns() // 1000
    # The TTL leaves the worker time to start and store both rows before one expires.
    expires = now + 6_000_000
    expiring = Mutation("insert", now, (1, "a", 1, "x"), {"v1": (1, expires)})
    lasting = Mutation("insert", now, (1, "a", 2, "x"), {"v1": (2, None)})
    await produce(stack.kafka, topic, [schemaless_record(m, keyspace) for m in (expiring, lasting)])
    env = sink_env(
        stack, topic=topic, group=unique("g"), schema=schema, sink__expiry_interval_seconds="0.5"
    )
    worker = SinkApp(load_config(env))
    task = asyncio.create_task(worker.run())
    try:
        columns = ("v1",)
        async with asyncio.timeout(60):
            while len(await read_rows(stack.postgres_dsn, schema, "cdc_model", columns)) < 2:
                await asyncio.sleep(0.2)
        assert worker.probes is not None
        port = worker.probes.port
        status, body = await asyncio.to_thread(http_get, port, "/health")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, body = await asyncio.to_thread(http_get, port, "/ready")
        assert status == 200
        assert json.loads(body) == {"postgres": True, "group": "joined", "assigned_partitions": 8}
        status, metrics = await asyncio.to_thread(http_get, port, "/metrics")
        assert status == 200
        for name in (
            "cdc_events_processed_total",
            "cdc_processing_latency_seconds",
            "cdc_errors_total",
            "cdc_backlog_depth",
            "cdc_batch_size",
            "cdc_transaction_duration_seconds",
        ):
            assert name in metrics, name
        assert (
            f'cdc_events_processed_total{{op="insert",table="cdc_model",topic="{topic}"}} 2.0'
            in (metrics)
        )
        async with asyncio.timeout(30):
            while len(await read_rows(stack.postgres_dsn, schema, "cdc_model", columns)) != 1:
                await asyncio.sleep(0.2)
        assert await read_rows(stack.postgres_dsn, schema, "cdc_model", columns) == {
            (1, "a", 2, "x"): {"v1": 2}
        }
        assert time.time_ns() // 1000 >= expires
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def test_events_are_counted_by_their_operation(stack: Endpoints, unique: Unique) -> None:
    """After a stream mixing every kind of change, a dead letter and a Kafka tombstone,
    /metrics counts each committed event under its operation, exactly; the dead letter and the
    tombstone are counted under none."""
    keyspace, topic, schema = unique.keyspace("ks"), unique("cdc-events-ops"), unique.schema("ops")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    ts = 1_700_000_000_000_000
    changes = {
        "insert": [
            Mutation("insert", ts + i, (i % 2, "a", i, "x"), {"v1": (i, None)}) for i in range(7)
        ],
        "update": [
            Mutation("update", ts + 10 + i, (0, "a", i, "y"), {"v2": (f"u{i}", None)})
            for i in range(5)
        ],
        "delete": [Mutation("delete_row", ts + 20 + i, (1, "a", i, "x")) for i in range(3)],
        "partition_delete": [Mutation("delete_partition", ts + 30, (p, "b")) for p in (0, 1)],
        "range_delete": [
            Mutation("delete_range", ts + 40 + p, (p, "a"), {}, (5,), True, (), True)
            for p in (0, 1)
        ],
        "snapshot": [
            Mutation("insert", ts + 50 + i, (1, "b", i, "z"), {"v3": (i, None)}) for i in range(4)
        ],
    }
    records: list[tuple[bytes | None, bytes | None]] = []
    for name, mutations in changes.items():
        for m in mutations:
            key, value = schemaless_record(m, keyspace)
            if name == "snapshot":
                envelope = json.loads(value)
                envelope["source"]["snapshot"] = "true"
                value = json.dumps(envelope).encode()
            records.append((key, value))
    records.append((b'{"p1": 0}', b"not json"))  # dead-lettered
    records.append((records[0][0], None))  # the Kafka tombstone after a delete
    await produce_positions(stack.kafka, topic, records)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, http__host="127.0.0.1")
    worker = SinkApp(load_config(env))
    running = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(60):
            while worker.probes is None or await applied(stack.postgres_dsn, schema) < len(records):
                assert not running.done()
                await asyncio.sleep(0.1)
        status, metrics = await asyncio.to_thread(http_get, worker.probes.port, "/metrics")
        assert status == 200
        counted = {
            sample.labels["op"]: sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "cdc_events_processed_total"
        }
        assert counted == {name: len(mutations) for name, mutations in changes.items()}
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)


def cdc_sink(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(env, *args, timeout=120)


@pytest.mark.parametrize("codec", ["zstd", "lz4", "snappy", "gzip"])
async def test_topics_compressed_with_any_kafka_codec_are_read(
    stack: Endpoints, unique: Unique, codec: str
) -> None:
    """Producers (Kafka Connect's included) and brokers compress batches; the worker reads
    every codec Kafka has (it stopped on the first zstd, lz4 or snappy batch once)."""
    keyspace, schema = unique.keyspace("ks"), unique.schema(codec)
    topic = unique(f"cdc-events-{codec}")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, 2, {"compression.type": codec})
    rows = [Mutation("insert", 1_000 + i, (0, "a", i, "x"), {"v1": (i, None)}) for i in range(50)]
    await produce(stack.kafka, topic, [schemaless_record(m, keyspace) for m in rows])
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    worker = await run_worker(env)
    assert worker.applied_events == len(rows)
    stored = await read_rows(stack.postgres_dsn, schema, "cdc_model", ("v1",))
    assert stored == {m.key: {"v1": m.cells["v1"][0]} for m in rows}


async def test_migrate_is_idempotent(stack: Endpoints, unique: Unique) -> None:
    """`migrate` creates every control table once; a second run has nothing to apply."""
    schema = unique.schema("migrate")
    env = {"CDC_POSTGRES__DSN": stack.postgres_dsn, "CDC_POSTGRES__SCHEMA": schema}
    first = await asyncio.to_thread(cdc_sink, "migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "applied: 001_control_tables" in first.stdout
    second = await asyncio.to_thread(cdc_sink, "migrate", env=env)
    assert second.returncode == 0
    assert "nothing to apply" in second.stdout
    import asyncpg

    conn = await asyncpg.connect(stack.postgres_dsn)
    try:
        tables = {
            r["tablename"]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema
            )
        }
    finally:
        await conn.close()
    assert {
        "_cdc_checkpoints",
        "_cdc_schema_metadata",
        "_cdc_dlq_records",
        "_cdc_reconciliation_jobs",
        "_cdc_reconciliation_mismatches",
        "_cdc_audit_log",
        "_cdc_migrations",
    } <= tables


async def test_a_role_given_only_its_schema_migrates_and_one_without_is_told_why(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """A locked-down role: CREATE on a schema a DBA made, nothing on the database. `migrate`
    works there (it used to ask for CREATE on the database); without CREATE on the schema it
    exits 1 naming the schema and the privilege, not with a traceback."""
    role, schema, bare = unique("role"), unique("granted"), unique("bare")
    admin = await asyncpg.connect(stack["CDC_STACK_POSTGRES_ADMIN_DSN"])
    parts = urlsplit(stack.postgres_dsn)
    dsn = urlunsplit(parts._replace(netloc=f"{role}:pw-{role}@{parts.hostname}:{parts.port}"))
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'")
        await admin.execute(
            f"CREATE SCHEMA {schema}; GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}"
        )
        await admin.execute(f"CREATE SCHEMA {bare}; GRANT USAGE ON SCHEMA {bare} TO {role}")
        granted = await asyncio.to_thread(
            cdc_sink, "migrate", env={"CDC_POSTGRES__DSN": dsn, "CDC_POSTGRES__SCHEMA": schema}
        )
        assert granted.returncode == 0, granted.stderr
        assert "applied: 001_control_tables" in granted.stdout
        refused = await asyncio.to_thread(
            cdc_sink, "migrate", env={"CDC_POSTGRES__DSN": dsn, "CDC_POSTGRES__SCHEMA": bare}
        )
        assert refused.returncode == 1
        assert f"cannot apply the migrations in schema '{bare}' (42501" in refused.stderr
        assert "needs USAGE and CREATE on the schema" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.execute(f"DROP SCHEMA IF EXISTS {bare} CASCADE")
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


DML_GRANTS = (
    "GRANT USAGE ON SCHEMA {schema} TO {role}; "
    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}; "
    "GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role}"
)


@contextlib.asynccontextmanager
async def limited_worker(
    stack: Endpoints, unique: Callable[[str], str], grants: str
) -> AsyncIterator[tuple[dict[str, str], Callable[[], Awaitable[int]]]]:
    """Migrations applied by the schema's owner, one event of a new table waiting, and the
    settings of a worker logging in as a new role the owner gave `grants` ({schema} and
    {role} filled in); with them, how many offsets the worker has committed."""
    role, schema, topic = unique("role"), unique("limited"), unique("cdc-events-limited")
    keyspace = unique("ks")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, 1)
    m = Mutation("insert", 1_000, (0, "a", 1, "x"), {"v1": (1, None)})
    await produce(stack.kafka, topic, [schemaless_record(m, keyspace)])
    owner_env = {"CDC_POSTGRES__DSN": stack.postgres_dsn, "CDC_POSTGRES__SCHEMA": schema}
    assert (await asyncio.to_thread(cdc_sink, "migrate", env=owner_env)).returncode == 0
    admin = await asyncpg.connect(stack["CDC_STACK_POSTGRES_ADMIN_DSN"])
    owner = await asyncpg.connect(stack.postgres_dsn)
    parts = urlsplit(stack.postgres_dsn)
    dsn = urlunsplit(parts._replace(netloc=f"{role}:pw-{role}@{parts.hostname}:{parts.port}"))

    async def committed() -> int:
        return int(
            await owner.fetchval(
                f"SELECT coalesce(sum(next_offset), 0) FROM {schema}._cdc_checkpoints"
            )
        )

    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'")
        await owner.execute(grants.format(schema=schema, role=role))
        env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
        yield {**env, "CDC_POSTGRES__DSN": dsn}, committed
    finally:
        await owner.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await owner.close()
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_a_role_that_may_write_but_not_create_stops_at_a_new_table_saying_so(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """Migrations applied by the owner; the worker's role may read and write the control
    tables but not create tables. It starts (no DDL when up to date), and a new table's
    first event stops it with PostgreSQL's reason and the table's name, nothing committed."""
    async with limited_worker(stack, unique, DML_GRANTS) as (env, committed):
        with pytest.raises(
            FatalError, match=r"refused to create or change table 'cdc_model'.*42501"
        ):
            await run_worker(env)
        assert await committed() == 0  # the claim made the partition's row; no offset moved


async def test_a_control_table_the_role_may_not_read_stops_the_worker_saying_so(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """A grant missing on a control table the worker reads while preparing a batch (the
    recorded table schemas): the worker stops with PostgreSQL's reason, not a traceback,
    and nothing is committed."""
    grants = (
        DML_GRANTS
        + "; GRANT CREATE ON SCHEMA {schema} TO {role}"
        + "; REVOKE SELECT ON {schema}._cdc_schema_metadata FROM {role}"
    )
    async with limited_worker(stack, unique, grants) as (env, committed):
        with pytest.raises(
            FatalError, match=r"42501.*permission denied for table _cdc_schema_metadata"
        ):
            await run_worker(env)
        assert await committed() == 0


def emb_record(keyspace: str, i: int, **cells: Any) -> tuple[bytes, bytes]:
    """A schemaless JSON insert into keyspace.emb, as the connector writes one."""
    source = {"keyspace": keyspace, "table": "emb", "ts_us": 1_000 + i, "snapshot": "false"}
    after = {name: {"value": v, "deletion_ts": None, "set": True} for name, v in cells.items()}
    value = {"op": "i", "source": source, "after": {"id": after.pop("id"), **after}}
    return json.dumps({"id": i}).encode(), json.dumps(value).encode()


async def test_a_cassandra_type_the_sink_cannot_map_stops_only_the_records_that_write_it(
    stack: Endpoints, unique: Unique
) -> None:
    """Cassandra 5.0's vector type has no mapping yet. A table with such a column is made
    without it; events that do not write it apply; one that does is dead-lettered naming the
    type. (Reading the table's schema used to fail, and stop the worker at every event.)"""
    # The keyspace goes when the test ends: Debezium's agent on the stack cannot parse a vector
    # type, and while one exists anywhere in the cluster it no longer hears of new tables.
    keyspace, schema = unique.keyspace("ks"), unique.schema("vector")
    topic = unique("cdc-events-vector")
    session = cassandra_session(stack)
    try:
        session.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute(
            f"CREATE TABLE {keyspace}.emb (id int PRIMARY KEY, name text, "
            "embedding vector<float, 3>) WITH cdc = true"
        )
        await create_topic(stack.kafka, topic, 1)
        records = [emb_record(keyspace, i, id=i, name=f"n{i}") for i in range(5)]
        records.insert(2, emb_record(keyspace, 9, id=9, name="v", embedding=[0.5, 1.0, 1.5]))
        await produce(stack.kafka, topic, records)
        env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, dlq__max_share="1")
        worker = await run_worker(env)
        assert worker.applied_events == len(records)
        conn = await asyncpg.connect(stack.postgres_dsn)
        try:
            rows = await conn.fetch(f"SELECT id, name FROM {schema}.cdc_emb ORDER BY id")
            letters = await conn.fetch(
                f"SELECT error_class, error_message FROM {schema}._cdc_dlq_records"
            )
        finally:
            await conn.close()
        assert [tuple(r) for r in rows] == [(i, f"n{i}") for i in range(5)]
        [(error_class, message)] = [tuple(r) for r in letters]
        assert error_class == "EventError"
        assert "'embedding': Cassandra's type 'vector<float, 3>' is not supported" in message
    finally:
        session.cluster.shutdown()


def test_invalid_setting_stops_start_up_naming_it() -> None:
    """A bad value fails at start-up with a message naming the setting, and exit code 2."""
    done = cdc_sink("run", env={"CDC_SINK__BATCH_SIZE": "lots"})
    assert done.returncode == 2
    assert "CDC_SINK__BATCH_SIZE" in done.stderr
    typo = cdc_sink("run", env={"CDC_KAFKA__GROUPID": "x"})
    assert typo.returncode == 2
    assert "CDC_KAFKA__GROUPID is not a known setting" in typo.stderr


async def test_cassandra_away_when_a_new_table_needs_its_schema_is_waited_for(
    stack: Endpoints, unique: Unique
) -> None:
    """Reading a new table's column types from an unreachable Cassandra is retried with
    backoff like any transient failure, then stops the worker saying so (it was an unhandled
    driver exception at the first attempt); nothing is committed or dead-lettered."""
    keyspace, topic, schema = unique("ks"), unique("cdc-events-nocass"), unique.schema("nocass")
    await create_topic(stack.kafka, topic, 1)
    m = Mutation("insert", 1_000, (0, "a", 1, "x"), {"v1": (1, None)})
    await produce(stack.kafka, topic, [schemaless_record(m, keyspace)])
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    env |= {
        "CDC_CASSANDRA__PORT": "1",
        "CDC_SINK__RETRY_ATTEMPTS": "3",
        "CDC_SINK__RETRY_BASE_SECONDS": "0.05",
        "CDC_SINK__RETRY_MAX_SECONDS": "0.1",
    }
    with pytest.raises(FatalError, match=r"gave up after 3 attempts.*Cassandra"):
        await run_worker(env)
    assert await read_rows(stack.postgres_dsn, schema, "cdc_model", ("v1",)) == {}


def test_a_dsn_the_driver_refuses_stops_start_up_without_a_traceback() -> None:
    """A DSN parameter asyncpg rejects (a client-side error, before any connection) ends with
    the usual message and exit 1; the password in the DSN is not shown."""
    dsn = "postgresql://cdc_sink:S3CRET@127.0.0.1:1/cdc?target_session_attrs=bogus"
    done = cdc_sink("migrate", env={"CDC_POSTGRES__DSN": dsn})
    assert done.returncode == 1
    assert "cannot connect to PostgreSQL (CDC_POSTGRES__DSN)" in done.stderr
    assert "Traceback" not in done.stderr
    assert "S3CRET" not in done.stderr + done.stdout


async def test_sigterm_stops_the_worker_cleanly(
    stack: Endpoints, unique: Unique, tmp_path: Path
) -> None:
    """SIGTERM to a running worker: it leaves the group and exits 0 within seconds."""
    topic, schema = unique("cdc-events-term"), unique.schema("term")
    await create_topic(stack.kafka, topic)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    full = {**os.environ, **env, "PYTHONPATH": str(REPO / "src")}
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cdc_sink", "run"], env=full, stdout=out, stderr=out
        )
    try:
        await asyncio.sleep(6)
        assert worker.poll() is None, log.read_text()
        began = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, 30)
        assert code == 0, log.read_text()[-2000:]
        assert time.monotonic() - began < 30
    finally:
        if worker.poll() is None:
            worker.kill()
