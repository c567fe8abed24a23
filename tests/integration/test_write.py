"""PgWriter on real PostgreSQL: what one batch stores decides the next batches correctly."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from cdc_sink.apply.writer import Batch, CheckpointMove, PgWriter, prepare_connection
from cdc_sink.dlq.letters import DeadLetter
from cdc_sink.errors import FencedError
from cdc_sink.model.events import Mutation as PlannedMutation
from cdc_sink.model.events import Position, interpret
from cdc_sink.ops.migrate import migrate
from tests.support.cassandra_model import COLUMNS, KEY, SCALARS, Mutation, to_envelope
from tests.support.names import Unique
from tests.support.stack import Endpoints
from tests.unit.test_plan_model import SCHEMA

TS = 1_900_000_000_000_000  # far in the future: no TTL question arises
FAILED_AT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
ROW = (1, "a", 1, "x")
PARTITION = (1, "a")


@pytest.fixture
async def writer(
    stack: Endpoints, unique: Unique
) -> AsyncIterator[tuple[PgWriter, asyncpg.Connection, str]]:
    schema = unique.schema("write")
    conn = await asyncpg.connect(stack.postgres_dsn, server_settings={"search_path": schema})
    await prepare_connection(conn)
    await migrate(conn, schema)
    await conn.execute(SCHEMA.create_sql(schema))
    await conn.execute(
        "INSERT INTO _cdc_schema_metadata (target_table, version, keyspace_name, source_table, "
        "key_columns, columns) VALUES ('cdc_model', 1, 'ks', 'model', $1, '{}')",
        list(KEY),
    )
    try:
        yield PgWriter(conn, schema, "group"), conn, schema
    finally:
        await conn.close()


def planned(m: Mutation) -> PlannedMutation:
    key, value = to_envelope(m)
    return SCHEMA.to_mutation(interpret(key, value, Position("t", 0, 0)))


async def apply(writer: PgWriter, *mutations: Mutation) -> None:
    """Each mutation in a batch of its own, so state must survive between transactions."""
    for m in mutations:
        await writer.apply(Batch(tables=[(SCHEMA, [planned(m)])]))


async def rows(
    conn: asyncpg.Connection, columns: tuple[str, ...] = SCALARS
) -> dict[tuple[Any, ...], dict[str, Any]]:
    found = await conn.fetch(f"SELECT {', '.join(KEY + columns)} FROM cdc_model")
    return {tuple(r[k] for k in KEY): {c: r[c] for c in columns} for r in found}


def update(ts: int, **values: Any) -> Mutation:
    return Mutation("update", ts, ROW, {k: (v, None) for k, v in values.items()})


def insert(ts: int, **values: Any) -> Mutation:
    return Mutation("insert", ts, ROW, {k: (v, None) for k, v in values.items()})


async def test_partition_tombstone_outlives_its_batch(writer: Any) -> None:
    """A write older than a stored partition delete, arriving later, stays deleted."""
    w, conn, _ = writer
    await apply(w, insert(TS + 1, v1=1), Mutation("delete_partition", TS + 5, PARTITION))
    await apply(w, insert(TS + 3, v1=3), update(TS + 9, v2="new"))
    assert await rows(conn) == {ROW: {"v1": None, "v2": "new", "v3": None}}


async def test_range_tombstone_outlives_its_batch(writer: Any) -> None:
    """A stored range delete shadows older writes inside the range, not outside it."""
    w, conn, _ = writer
    inside, outside = (1, "a", 2, "x"), (1, "a", 0, "x")
    rng = Mutation("delete_range", TS + 5, PARTITION, {}, (1,), True, (2,), True)
    await apply(w, rng)
    await apply(
        w,
        Mutation("insert", TS + 1, inside, {"v1": (1, None)}),
        Mutation("insert", TS + 1, outside, {"v1": (2, None)}),
    )
    assert await rows(conn) == {outside: {"v1": 2, "v2": None, "v3": None}}


async def test_one_batch_storing_a_range_tombstone_twice_keeps_the_newer(writer: Any) -> None:
    """Replicas of one range delete, and a later delete of the same range, in one batch: the
    tombstones go in as one row at the newest timestamp (a statement cannot upsert a row
    twice), and that timestamp shadows writes up to it."""
    w, conn, _ = writer
    older = Mutation("delete_range", TS + 5, PARTITION, {}, (1,), True, (2,), True)
    newer = Mutation("delete_range", TS + 8, PARTITION, {}, (1,), True, (2,), True)
    batch = [planned(m) for m in (newer, older, newer, older)]
    await w.apply(Batch(tables=[(SCHEMA, batch)]))
    stored = await conn.fetch("SELECT ts_us FROM _cdc_tombstones WHERE kind = 'range'")
    assert [r["ts_us"] for r in stored] == [TS + 8]
    inside = (1, "a", 2, "x")
    await apply(w, Mutation("insert", TS + 7, inside, {"v1": (1, None)}))
    assert await rows(conn) == {}
    await apply(w, Mutation("insert", TS + 9, inside, {"v1": (2, None)}))
    assert await rows(conn) == {inside: {"v1": 2, "v2": None, "v3": None}}


async def test_metadata_columns_hold_the_write_and_expiry_instants(writer: Any) -> None:
    """_cdc_write_ts is the newest live cell's write time, _cdc_expires_at the soonest expiry
    and _cdc_updated_at the wall clock of the commit (all from µs, to the microsecond)."""
    w, conn, _ = writer
    expires = TS + 86_400_000_000
    before = dt.datetime.now(dt.UTC)
    await apply(w, update(TS + 1, v1=1), update(TS + 7, v2="b"))
    await w.apply(
        Batch(tables=[(SCHEMA, [planned(Mutation("update", TS + 3, ROW, {"v3": (3, expires)}))])])
    )
    after = dt.datetime.now(dt.UTC)
    stored = await conn.fetchrow(
        "SELECT _cdc_write_ts, _cdc_expires_at, _cdc_updated_at FROM cdc_model"
    )
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert stored["_cdc_write_ts"] == epoch + dt.timedelta(microseconds=TS + 7)
    assert stored["_cdc_expires_at"] == epoch + dt.timedelta(microseconds=expires)
    assert before <= stored["_cdc_updated_at"] <= after


async def test_dead_row_remembers_its_cell_tombstones(writer: Any) -> None:
    """A row emptied by nulls is gone, and an older replica of its write does not revive it."""
    w, conn, _ = writer
    await apply(w, update(TS + 1, v1=1), update(TS + 2, v1=None))
    assert await rows(conn) == {}
    remembered = await conn.fetchval("SELECT count(*) FROM _cdc_tombstones WHERE kind = 'row'")
    assert remembered == 1
    await apply(w, update(TS + 1, v1=1))
    assert await rows(conn) == {}
    await apply(w, update(TS + 3, v3=7))  # a newer write does bring the row back
    assert await rows(conn) == {ROW: {"v1": None, "v2": None, "v3": 7}}
    gone = await conn.fetchval("SELECT count(*) FROM _cdc_tombstones WHERE kind = 'row'")
    assert gone == 0


async def test_an_emptied_collection_is_a_deletion_not_a_live_cell(writer: Any) -> None:
    """`SET v4 = null` (Debezium: an empty set) on a row with no other live cell stores no row,
    and its deletion, remembered, keeps an older element write of a later batch deleted; a
    newer one revives the row. With a row marker the row stays with v4 NULL; an empty frozen
    list is a value that keeps its row."""
    w, conn, _ = writer
    everything = {column: None for column in COLUMNS}
    await apply(w, update(TS + 5, v4=None))
    assert await rows(conn, COLUMNS) == {}
    await apply(w, update(TS + 1, v4=(1, 2)))
    assert await rows(conn, COLUMNS) == {}
    await apply(w, update(TS + 9, v4=(3,)))
    assert await rows(conn, COLUMNS) == {ROW: {**everything, "v4": [3]}}
    await apply(w, update(TS + 11, v4=None))
    assert await rows(conn, COLUMNS) == {}

    await apply(w, insert(TS + 20, v4=(1,)), update(TS + 21, v4=None))
    assert await rows(conn, COLUMNS) == {ROW: everything}
    other = (1, "a", 1, "x")
    await apply(w, Mutation("update", TS + 1, other, {"v5": ((), None)}))
    assert (await rows(conn, COLUMNS))[other] == {**everything, "v5": []}


async def test_row_delete_then_older_insert(writer: Any) -> None:
    """A row delete stored in one batch shadows an older INSERT replayed in the next."""
    w, conn, _ = writer
    await apply(w, insert(TS + 1, v1=1), Mutation("delete_row", TS + 2, ROW))
    await apply(w, insert(TS + 1, v1=1))
    assert await rows(conn) == {}


async def test_checkpoint_compare_and_set_fences_a_stale_worker(writer: Any) -> None:
    """A batch whose checkpoint move no longer matches the stored epoch commits nothing."""
    w, conn, _ = writer
    await conn.execute(
        "INSERT INTO _cdc_checkpoints (consumer_group, topic, kafka_partition, next_offset, "
        "epoch) VALUES ('group', 't', 0, 10, 2)"
    )
    stale = Batch(
        tables=[(SCHEMA, [planned(insert(TS, v1=1))])],
        checkpoints=[CheckpointMove("t", 0, expected=10, next_offset=11, epoch=1)],
    )
    with pytest.raises(FencedError):
        await w.apply(stale)
    assert await rows(conn) == {}
    fresh = Batch(
        tables=stale.tables,
        checkpoints=[CheckpointMove("t", 0, expected=10, next_offset=11, epoch=2)],
        dead_letters=[
            DeadLetter(
                "t", 0, 10, None, b"k", b"v", (), "DecodeError", "bad", "decode", None, FAILED_AT
            )
        ],
    )
    await w.apply(fresh)
    assert await conn.fetchval("SELECT next_offset FROM _cdc_checkpoints") == 11
    assert await conn.fetchval("SELECT count(*) FROM _cdc_dlq_records") == 1
    assert len(await rows(conn)) == 1
