"""Disaster recovery: a pg_dump taken mid-stream, restored into a fresh database, resumes."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from tests.support.cassandra_model import COLUMNS, expected_rows, replica_streams
from tests.support.names import Unique
from tests.support.pipeline import (
    applied,
    create_cassandra_model_table,
    create_topic,
    json_lines,
    kill,
    produce,
    random_history,
    read_rows,
    run_worker,
    schemaless_record,
    sink_env,
    start_worker_process,
    topic_partitions,
    wait_for_applied,
)
from tests.support.stack import Endpoints

MUTATIONS = 25_000  # three replica copies each: 75,000 events
METADATA = "_cdc_cells, _cdc_marker_ts, _cdc_deleted_ts"


def pg_tool(name: str) -> str:
    """The stack's PostgreSQL client tool (the same major version as its server)."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    assert found, f"no {name} under /usr/lib/postgresql"
    return str(found[-1])


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


@pytest.fixture
async def fresh_database(stack: Endpoints, unique: Unique) -> AsyncIterator[str]:
    """An empty database owned by the sink's role, as a restore target; its DSN. Dropped after."""
    name = unique("restored")
    role = urlsplit(stack.postgres_dsn).username
    admin = await asyncpg.connect(stack["CDC_STACK_POSTGRES_ADMIN_DSN"])
    try:
        await admin.execute(f'CREATE DATABASE "{name}" OWNER "{role}"')
        yield with_database(stack.postgres_dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def expire_everything(bootstrap: str, topic: str) -> None:
    """Delete every record the topic holds now, as retention does with old segments."""
    partitions = await topic_partitions(bootstrap, topic)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(-1) for tp in partitions})
    finally:
        await admin.close()


async def metadata(dsn: str, schema: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f'SELECT p1, p2, c1, c2, {METADATA} FROM "{schema}".cdc_model')
    finally:
        await conn.close()
    return sorted(tuple(r) for r in rows)


async def test_restored_backup_resumes_to_the_exact_state(
    stack: Endpoints, unique: Unique, fresh_database: str, tmp_path: Path
) -> None:
    """A pg_dump of the sink's schema taken while a worker applies a stream, restored into a
    fresh database after the stream went on, and a worker started there: the tables end exactly
    as Cassandra's SELECT (and as the database that never went away), every offset once."""
    rng = random.Random()
    history = random_history(rng, MUTATIONS, keys=1_500, base_ts=1_900_000_000_000_000)
    deliveries = replica_streams(history, iter(lambda: rng.randrange(1 << 30), None))
    keyspace = unique.keyspace("dr")
    records = [schemaless_record(m, keyspace) for m in deliveries]
    before_backup, after_backup = records[: len(records) * 2 // 3], records[len(records) * 2 // 3 :]
    topic, schema, group = unique("cdc-events-dr"), unique.schema("dr"), unique("group")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, before_backup)
    env = sink_env(stack, topic=topic, group=group, schema=schema, sink__batch_size="500")
    log, dump = tmp_path / "worker.log", tmp_path / "sink.dump"
    primary = start_worker_process(env, log, stop_when_caught_up=False)
    try:
        await wait_for_applied(stack.postgres_dsn, schema, len(before_backup) // 4, primary)
        assert primary.poll() is None, log.read_text()[-3000:]
        backup = [pg_tool("pg_dump"), "--format=custom", f"--schema={schema}", f"--file={dump}"]
        subprocess.run([*backup, stack.postgres_dsn], check=True, capture_output=True)
        await produce(stack.kafka, topic, after_backup)
        await wait_for_applied(stack.postgres_dsn, schema, len(records) - 1, primary)
        primary.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(primary.wait, 60) == 0, log.read_text()[-3000:]
    finally:
        kill(primary)
    assert await applied(stack.postgres_dsn, schema) == len(records)

    restore = [pg_tool("pg_restore"), "--exit-on-error", f"--dbname={fresh_database}"]
    subprocess.run([*restore, str(dump)], check=True, capture_output=True)
    at_backup = await applied(fresh_database, schema)
    assert 0 < at_backup < len(before_backup)  # the dump was taken mid-stream
    worker = await run_worker({**env, "CDC_POSTGRES__DSN": fresh_database})

    assert worker.applied_events == len(records) - at_backup
    assert await applied(fresh_database, schema) == len(records)
    restored = await read_rows(fresh_database, schema, "cdc_model", COLUMNS)
    assert restored == expected_rows(history)
    assert restored == await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS)
    assert await metadata(fresh_database, schema) == await metadata(stack.postgres_dsn, schema)


async def test_backup_older_than_retention_is_reported(
    stack: Endpoints, unique: Unique, tmp_path: Path
) -> None:
    """Checkpoints older than the first record Kafka still holds (a restore from a backup
    older than the retention): the worker goes on from the log's start and reports each
    partition's lost records, in all as many as retention deleted unapplied."""
    rng = random.Random()
    keyspace = unique.keyspace("drlost")
    history = random_history(rng, 900, keys=120, base_ts=1_900_000_000_000_000)
    records = [schemaless_record(m, keyspace) for m in history]
    applied_part, expired_part, later_part = records[:300], records[300:600], records[600:]
    topic, schema = unique("cdc-events-drlost"), unique.schema("drlost")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    env = sink_env(stack, topic=topic, group=unique("group"), schema=schema)
    await produce(stack.kafka, topic, applied_part)
    await run_worker(env)
    await produce(stack.kafka, topic, expired_part)
    await expire_everything(stack.kafka, topic)
    await produce(stack.kafka, topic, later_part)
    log = tmp_path / "worker.log"
    worker = start_worker_process(env, log)
    try:
        assert await asyncio.to_thread(worker.wait, 120) == 0, log.read_text()[-3000:]
    finally:
        kill(worker)

    lost = [e for e in json_lines(log.read_text()) if e["event"] == "offsets_lost_to_retention"]
    assert sum(e["lost"] for e in lost) == len(expired_part)
    assert all(e["log_start"] - e["checkpoint"] == e["lost"] > 0 for e in lost)
    assert await applied(stack.postgres_dsn, schema) == len(records)
