"""Cassandra columns named like the sink's own columns (or PostgreSQL's system columns) are
never made in PostgreSQL: the records that write them are dead-lettered, nothing else stops."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from cdc_recon.readers import connect_cassandra, resolve_table
from cdc_sink.config import load_config
from tests.support.pipeline import (
    create_topic,
    drop_schema,
    execute_cql,
    json_with_schema,
    produce,
    run_worker,
    sink_env,
)
from tests.support.stack import Endpoints

TS = 1_900_000_000_000_000


Record = tuple[bytes, bytes]


def record(
    keyspace: str, table: str, key: dict[str, Any], cells: dict[str, Any], *, op: str = "i"
) -> Record:
    """A schemaless JSON record (the types come from Cassandra's system_schema)."""
    columns = dict.fromkeys([*key, *cells], "string")
    key_bytes, value_bytes = json_with_schema(keyspace, table, columns, key, cells, op=op, ts_us=TS)
    return (
        json.dumps(json.loads(key_bytes)["payload"]).encode(),
        json.dumps(json.loads(value_bytes)["payload"]).encode(),
    )


async def fetch(dsn: str, schema: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def user_columns(dsn: str, schema: str, table: str) -> list[str]:
    rows = await fetch(
        dsn,
        schema,
        "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 "
        "AND table_name = $2 AND column_name NOT LIKE '\\_cdc\\_%' ORDER BY column_name",
        schema,
        table,
    )
    return [r[0] for r in rows]


def keyspace_cql(keyspace: str) -> str:
    return (
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )


async def letters(dsn: str, schema: str) -> list[tuple[str, str]]:
    rows = await fetch(
        dsn, schema, "SELECT error_class, error_message FROM _cdc_dlq_records ORDER BY id"
    )
    return [(r[0], r[1]) for r in rows]


async def test_a_new_table_with_reserved_column_names_is_made_without_them(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """`notes` has a column `_cdc_cells` (and `_CDC_CELLS`, which is no clash), `boxes` a key
    column `ctid`: the worker never stops; `cdc_notes` is made without `_cdc_cells`, the
    records writing it and every `boxes` record are dead-lettered naming the column, and the
    other records of both tables' topic are applied."""
    keyspace, topic, schema = unique("ks"), unique("cdc-events-reserved"), unique("reserved")
    execute_cql(
        stack,
        keyspace_cql(keyspace),
        f'CREATE TABLE {keyspace}.notes (id int PRIMARY KEY, body text, "_cdc_cells" text, '
        '"_CDC_CELLS" text)',
        f"CREATE TABLE {keyspace}.boxes (ctid int PRIMARY KEY, v int)",
        f"CREATE TABLE {keyspace}.other (id int PRIMARY KEY, v int)",
    )
    await create_topic(stack.kafka, topic, partitions=1)
    await produce(
        stack.kafka,
        topic,
        [
            record(keyspace, "notes", {"id": 1}, {"body": "a"}),
            record(keyspace, "notes", {"id": 2}, {"body": "b", "_cdc_cells": "x"}),
            record(keyspace, "boxes", {"ctid": 1}, {"v": 1}),
            record(keyspace, "notes", {"id": 3}, {"_CDC_CELLS": "upper"}),
            record(keyspace, "other", {"id": 1}, {"v": 1}),
            record(keyspace, "boxes", {"ctid": 2}, {}, op="d"),
            record(keyspace, "notes", {"id": 1}, {"body": "a2"}, op="u"),
        ],
    )
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    env["CDC_DLQ__MAX_SHARE"] = "1"  # three of seven records are refused, by design
    try:
        worker = await run_worker(env)
        assert worker.applied_events == 7
        assert await user_columns(stack.postgres_dsn, schema, "cdc_notes") == [
            "_CDC_CELLS",
            "body",
            "id",
        ]
        rows = await fetch(
            stack.postgres_dsn, schema, 'SELECT id, body, "_CDC_CELLS" FROM cdc_notes ORDER BY id'
        )
        assert [tuple(r) for r in rows] == [(1, "a2", None), (3, None, "upper")]
        other = await fetch(stack.postgres_dsn, schema, "SELECT id, v FROM cdc_other")
        assert [tuple(r) for r in other] == [(1, 1)]
        assert await user_columns(stack.postgres_dsn, schema, "cdc_boxes") == []
        dead = await letters(stack.postgres_dsn, schema)
        assert [c for c, _ in dead] == ["ReservedColumnError"] * 3
        assert f"'_cdc_cells' of {keyspace}.notes" in dead[0][1]
        assert f"'ctid' of {keyspace}.boxes" in dead[1][1]
        assert "system column" in dead[1][1]
        assert f"'ctid' of {keyspace}.boxes" in dead[2][1]

        # Reconciliation leaves the column out too (the target's `_cdc_cells` is the sink's).
        session = await asyncio.to_thread(connect_cassandra, load_config(env).cassandra, "ONE")
        conn = await asyncpg.connect(stack.postgres_dsn, server_settings={"search_path": schema})
        try:
            notes = await resolve_table(conn, schema, session, "cdc_notes")
        finally:
            await conn.close()
            await asyncio.to_thread(session.cluster.shutdown)
        assert list(notes.columns) == ["id", "_CDC_CELLS", "body"]
        assert notes.cassandra_only == ("_cdc_cells",)
        assert list(notes.sink_schema().columns) == ["id", "_CDC_CELLS", "body"]
    finally:
        await drop_schema(stack.postgres_dsn, schema)


@dataclass
class Ledger:
    """Cassandra's `ledger (id int PRIMARY KEY, amount int)`, its topic, and a worker's
    settings and schema, in which `cdc_ledger` was made by a first record (id 1, amount 5)."""

    keyspace: str
    topic: str
    schema: str
    env: dict[str, str]

    def record(self, key: dict[str, Any], cells: dict[str, Any], op: str = "i") -> Record:
        return record(self.keyspace, "ledger", key, cells, op=op)


@pytest.fixture
async def ledger(stack: Endpoints, unique: Callable[[str], str]) -> AsyncIterator[Ledger]:
    """The Ledger, its schema dropped afterwards."""
    keyspace, topic, schema = unique("ks"), unique("cdc-events-ledger"), unique("ledger")
    execute_cql(
        stack,
        keyspace_cql(keyspace),
        f"CREATE TABLE {keyspace}.ledger (id int PRIMARY KEY, amount int)",
    )
    await create_topic(stack.kafka, topic, partitions=1)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    made = Ledger(keyspace, topic, schema, env)
    made.env["CDC_DLQ__MAX_SHARE"] = "1"  # some records are refused, by design
    try:
        await produce(stack.kafka, topic, [made.record({"id": 1}, {"amount": 5})])
        await run_worker(made.env)
        yield made
    finally:
        await drop_schema(stack.postgres_dsn, schema)


async def test_a_reserved_column_added_later_is_not_added_and_the_table_flows(
    stack: Endpoints, ledger: Ledger
) -> None:
    """`ALTER TABLE ledger ADD` of `xmin`, `_cdc_marker_ts` and `extra` in Cassandra: the
    target gets `extra` only; records writing a reserved column are dead-lettered naming it,
    the others (on the same table, before and after them) are applied, and a later worker
    starts and goes on."""
    keyspace, schema = ledger.keyspace, ledger.schema
    execute_cql(
        stack,
        f'ALTER TABLE {keyspace}.ledger ADD (xmin int, "_cdc_marker_ts" bigint, extra text)',
    )
    await produce(
        stack.kafka,
        ledger.topic,
        [
            ledger.record({"id": 1}, {"extra": "e", "xmin": 3}, op="u"),
            ledger.record({"id": 2}, {"amount": 7, "extra": "f"}),
            ledger.record({"id": 2}, {"_cdc_marker_ts": 9}, op="u"),
            ledger.record({"id": 1}, {"amount": 6}, op="u"),
        ],
    )
    worker = await run_worker(ledger.env)
    assert worker.applied_events == 4
    await produce(stack.kafka, ledger.topic, [ledger.record({"id": 3}, {"extra": "g"})])
    await run_worker(ledger.env)
    assert await user_columns(stack.postgres_dsn, schema, "cdc_ledger") == ["amount", "extra", "id"]
    rows = await fetch(
        stack.postgres_dsn, schema, "SELECT id, amount, extra FROM cdc_ledger ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [(1, 6, None), (2, 7, "f"), (3, None, "g")]
    dead = await letters(stack.postgres_dsn, schema)
    assert [c for c, _ in dead] == ["ReservedColumnError"] * 2
    assert f"'xmin' of {keyspace}.ledger" in dead[0][1]
    assert f"'_cdc_marker_ts' of {keyspace}.ledger" in dead[1][1]


async def test_a_reserved_column_an_earlier_release_recorded_does_not_stop_the_table(
    stack: Endpoints, ledger: Ledger
) -> None:
    """An earlier release "added" Cassandra's `_cdc_marker_ts` (ADD COLUMN IF NOT EXISTS passed
    over the sink's own column) and recorded it as the table's: every batch of the table then
    failed. Loaded back now, the table is the sink's again and its records are applied."""
    keyspace, schema = ledger.keyspace, ledger.schema
    execute_cql(stack, f'ALTER TABLE {keyspace}.ledger ADD "_cdc_marker_ts" bigint')
    await fetch(  # what the earlier release recorded next
        stack.postgres_dsn,
        schema,
        "INSERT INTO _cdc_schema_metadata (target_table, version, keyspace_name, "
        "source_table, key_columns, columns) VALUES ('cdc_ledger', 2, $1, 'ledger', "
        """'{id}', '{"id": "int", "amount": "int", "_cdc_marker_ts": "bigint"}')""",
        keyspace,
    )
    await produce(
        stack.kafka,
        ledger.topic,
        [ledger.record({"id": 1}, {"amount": 6}, op="u"), ledger.record({"id": 2}, {"amount": 7})],
    )
    worker = await run_worker(ledger.env)
    assert worker.applied_events == 2
    rows = await fetch(stack.postgres_dsn, schema, "SELECT id, amount FROM cdc_ledger ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, 6), (2, 7)]
    assert await letters(stack.postgres_dsn, schema) == []
