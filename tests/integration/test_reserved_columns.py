"""Cassandra tables with a column named like the sink's own columns (or PostgreSQL's system
columns) are refused whole: their records are dead-lettered naming the column, so no row is ever
half applied, and nothing else stops."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from cdc_recon.readers import connect_cassandra
from cdc_recon.targets import resolve_table
from cdc_sink.config import load_config
from tests.support.names import Unique
from tests.support.pipeline import (
    create_topic,
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


async def test_a_new_table_with_a_reserved_column_name_is_refused_whole(
    stack: Endpoints, unique: Unique
) -> None:
    """`notes` has a column `_cdc_cells`, `boxes` a key column `ctid`, `upper` a column
    `_CDC_CELLS` (no clash): the worker never stops; every record of `notes` and `boxes` is
    dead-lettered naming the column, whether it writes it or not, neither table is made, and
    the records of `upper` and `other` on the same topic are applied."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("reserved")
    topic = unique("cdc-events-reserved")
    execute_cql(
        stack,
        keyspace_cql(keyspace),
        f'CREATE TABLE {keyspace}.notes (id int PRIMARY KEY, body text, "_cdc_cells" text)',
        f'CREATE TABLE {keyspace}.upper (id int PRIMARY KEY, "_CDC_CELLS" text)',
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
            record(keyspace, "upper", {"id": 3}, {"_CDC_CELLS": "upper"}),
            record(keyspace, "other", {"id": 1}, {"v": 1}),
            record(keyspace, "boxes", {"ctid": 2}, {}, op="d"),
            record(keyspace, "notes", {"id": 1}, {"body": "a2"}, op="u"),
        ],
    )
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    env["CDC_DLQ__MAX_SHARE"] = "1"  # three of seven records are refused, by design
    worker = await run_worker(env)
    assert worker.applied_events == 7
    tables = await fetch(
        stack.postgres_dsn,
        schema,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 "
        "AND table_name LIKE 'cdc\\_%' ORDER BY 1",
        schema,
    )
    assert [r[0] for r in tables] == ["cdc_other", "cdc_upper"]
    upper = await fetch(stack.postgres_dsn, schema, 'SELECT id, "_CDC_CELLS" FROM cdc_upper')
    assert [tuple(r) for r in upper] == [(3, "upper")]
    other = await fetch(stack.postgres_dsn, schema, "SELECT id, v FROM cdc_other")
    assert [tuple(r) for r in other] == [(1, 1)]
    dead = await letters(stack.postgres_dsn, schema)
    assert [c for c, _ in dead] == ["ReservedColumnError"] * 5
    for _, message in (dead[0], dead[1], dead[4]):
        assert f"'_cdc_cells' of {keyspace}.notes" in message
    for _, message in (dead[2], dead[3]):
        assert f"'ctid' of {keyspace}.boxes" in message
        assert "system column" in message


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
async def ledger(stack: Endpoints, unique: Unique) -> Ledger:
    """The Ledger; its schema and keyspace go when the test ends."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("ledger")
    topic = unique("cdc-events-ledger")
    execute_cql(
        stack,
        keyspace_cql(keyspace),
        f"CREATE TABLE {keyspace}.ledger (id int PRIMARY KEY, amount int)",
    )
    await create_topic(stack.kafka, topic, partitions=1)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    made = Ledger(keyspace, topic, schema, env)
    made.env["CDC_DLQ__MAX_SHARE"] = "1"  # some records are refused, by design
    await produce(stack.kafka, topic, [made.record({"id": 1}, {"amount": 5})])
    await run_worker(made.env)
    return made


async def test_a_reserved_column_added_later_refuses_the_table_from_then_on(
    stack: Endpoints, ledger: Ledger
) -> None:
    """`ALTER TABLE ledger ADD` of `xmin`, `_cdc_marker_ts` and `extra` in Cassandra: from the
    first record that shows the clash, every record of the table is dead-lettered naming a
    reserved column (also in a later worker, which finds it in Cassandra's schema); the row
    applied before stays, nothing is added to the target, and reconciliation compares only the
    columns the target mirrors."""
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
    assert await user_columns(stack.postgres_dsn, schema, "cdc_ledger") == ["amount", "id"]
    rows = await fetch(stack.postgres_dsn, schema, "SELECT id, amount FROM cdc_ledger ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, 5)]
    dead = await letters(stack.postgres_dsn, schema)
    assert [c for c, _ in dead] == ["ReservedColumnError"] * 5
    assert all(f"'xmin' of {keyspace}.ledger" in message for _, message in dead[:4])
    assert f"of {keyspace}.ledger has a name the target table cannot take" in dead[4][1]

    # Reconciliation leaves the reserved columns out (the target's `_cdc_marker_ts` is the
    # sink's own), like the column the target never got.
    session = await asyncio.to_thread(connect_cassandra, load_config(ledger.env).cassandra, "ONE")
    conn = await asyncpg.connect(stack.postgres_dsn, server_settings={"search_path": schema})
    try:
        table = await resolve_table(conn, schema, session, "cdc_ledger")
    finally:
        await conn.close()
        await asyncio.to_thread(session.cluster.shutdown)
    assert list(table.columns) == ["id", "amount"]
    assert sorted(table.cassandra_only) == ["_cdc_marker_ts", "extra", "xmin"]


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
