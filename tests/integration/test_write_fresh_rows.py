"""PgWriter's direct path for rows one write makes from nothing leaves exactly the tables the
general merge leaves: the same batches through both, on real PostgreSQL, compared column by
column (metadata and tombstones included)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cdc_sink.apply.writer import Batch, PgWriter, prepare_connection
from cdc_sink.decode.decoder import Decoder
from cdc_sink.model.events import Mutation as PlannedMutation
from cdc_sink.model.events import Position, interpret
from cdc_sink.ops.migrate import migrate
from cdc_sink.schema.tables import TableSchema, quote_ident
from cdc_synth import synth
from tests.support.cassandra_model import KEY, Mutation, replica_streams, to_envelope
from tests.support.names import Unique
from tests.support.stack import Endpoints
from tests.unit.test_plan_model import NOW, SCHEMA, histories

Pair = tuple[PgWriter, PgWriter]
SYNTH_NOW = 1_800_000_000_000_000  # after every synth TTL of the generated stretch below
IGNORED = ("_cdc_updated_at", "recorded_at")  # the wall clock of the write, not its outcome


@pytest.fixture
async def pair(stack: Endpoints, unique: Unique) -> AsyncIterator[Pair]:
    """A direct-path writer and a general-merge writer, each on its own connection and schema
    holding the model table and the synth tables."""
    writers = []
    try:
        for name, direct in (("direct", True), ("merged", False)):
            schema = unique.schema(name)
            conn = await asyncpg.connect(
                stack.postgres_dsn, server_settings={"search_path": schema}
            )
            writers.append(PgWriter(conn, schema, "group", fresh_rows_direct=direct))
            await prepare_connection(conn)
            await migrate(conn, schema)
            for table in (SCHEMA, *synth_schemas()):
                await conn.execute(table.create_sql(schema))
            await conn.execute(
                "INSERT INTO _cdc_schema_metadata (target_table, version, keyspace_name, "
                "source_table, key_columns, columns) VALUES ('cdc_model', 1, 'ks', 'model', $1, "
                "'{}')",
                list(KEY),
            )
        yield writers[0], writers[1]
    finally:
        for writer in writers:
            await writer.conn.close()


def synth_schemas() -> list[TableSchema]:
    return [synth.target_schema(name) for name in synth.TABLES]


async def contents(writer: PgWriter, table: str) -> list[dict[str, Any]]:
    """Every row of a table with every column but the wall-clock ones, in a stable order."""
    found = await writer.conn.fetch(f"SELECT * FROM {quote_ident(table)}")
    rows = [{k: v for k, v in r.items() if k not in IGNORED} for r in found]
    return sorted(rows, key=repr)


async def assert_same_tables(pair: Pair, tables: list[str]) -> None:
    direct, merged = pair
    for table in [*tables, "_cdc_tombstones"]:
        assert await contents(direct, table) == await contents(merged, table), table


async def apply_both(pair: Pair, batches: list[Batch], now_us: int) -> None:
    for writer in pair:
        for batch in batches:
            await writer.apply(batch, now_us=now_us)


def planned(m: Mutation, offset: int) -> PlannedMutation:
    key, value = to_envelope(m)
    return SCHEMA.to_mutation(interpret(key, value, Position("t", 0, offset)))


@settings(
    max_examples=60,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=histories(), seed=st.integers(0, 2**32), sizes=st.lists(st.integers(1, 30)))
async def test_fresh_rows_match_the_general_merge_on_generated_histories(
    pair: Pair, history: list[Mutation], seed: int, sizes: list[int]
) -> None:
    """Replica copies, duplicates, deletes, TTLs on either side of now and ties, in any
    batching: both writers leave identical rows, cell stamps and tombstones."""
    for writer in pair:  # each example starts from empty tables
        await writer.conn.execute("TRUNCATE cdc_model, _cdc_tombstones")
    rng = random.Random(seed)
    deliveries = replica_streams(history, iter(lambda: rng.randrange(1 << 30), None))
    for _ in range(rng.randrange(0, 4)):
        start = rng.randrange(len(deliveries))
        deliveries[start:start] = deliveries[start : start + rng.randrange(1, 6)]
    planned_all = [planned(m, n) for n, m in enumerate(deliveries)]
    batches, sizes_left = [], iter(sizes)
    while planned_all:
        size = next(sizes_left, 7)
        batches.append(Batch(tables=[(SCHEMA, planned_all[:size])]))
        planned_all = planned_all[size:]
    await apply_both(pair, batches, NOW)
    await assert_same_tables(pair, ["cdc_model"])


class _NoRegistry:
    async def schema_by_id(self, schema_id: int) -> str:
        raise AssertionError("JSON with embedded schemas needs no registry")


async def test_fresh_rows_match_the_general_merge_on_a_synthetic_stream(pair: Pair) -> None:
    """The benchmark's mix (fresh rows, updates of stored rows, row, partition and range
    deletes, TTLs) in batches of 500: both writers leave identical tables."""
    events = synth.generate(6000, seed=7, start_us=SYNTH_NOW - 10_000_000_000)
    encoder, decoder = synth.JsonEncoder(), Decoder(_NoRegistry())  # type: ignore[arg-type]
    schemas = {s.table: s for s in synth_schemas()}
    batches = []
    for start in range(0, len(events), 500):
        per_table: dict[str, list[PlannedMutation]] = {}
        for n, event in enumerate(events[start : start + 500]):
            decoded = await decoder.decode(*encoder.encode(event))
            change = interpret(decoded.key, decoded.value, Position("t", 0, start + n))
            per_table.setdefault(change.table, []).append(schemas[change.table].to_mutation(change))
        batches.append(Batch(tables=[(schemas[t], m) for t, m in per_table.items()]))
    await apply_both(pair, batches, SYNTH_NOW)
    await assert_same_tables(pair, [s.target for s in schemas.values()])
    assert await pair[0].conn.fetchval("SELECT count(*) FROM cdc_users") > 0


async def test_fresh_rows_match_the_general_merge_on_each_kind_of_first_write(pair: Pair) -> None:
    """First writes of every shape (emptied collections, TTLs live and expired, markers alone,
    rows under a stored partition tombstone, older and newer than it): identical tables, and
    an emptied collection's cell stamped one microsecond below its INSERT."""
    ts, soon, gone = NOW - 5_000, NOW + 9_000, NOW - 1_000
    first = [
        Mutation("insert", ts, (0, "a", 0, "x"), {"v1": (1, None), "v4": (None, None)}),
        Mutation("update", ts, (0, "a", 0, "y"), {"v1": (2, None), "v4": (None, None)}),
        Mutation("insert", ts, (0, "a", 1, "x"), {"v1": (3, soon)}, marker_expires=soon),
        Mutation("insert", ts, (0, "a", 1, "y"), {"v1": (4, gone)}, marker_expires=gone),
        Mutation("update", ts, (0, "a", 2, "x"), {"v1": (5, gone), "v2": ("z", soon)}),
        Mutation("update", ts, (0, "a", 2, "y"), {"v1": (None, None)}),
        Mutation("insert", ts, (0, "b", 0, "x"), {"v1": (None, None)}),
        Mutation("insert", ts - 10, (1, "a", 0, "x"), {"v1": (6, None)}),
        Mutation("update", ts + 10, (1, "a", 0, "y"), {"v2": ("w", None)}),
        Mutation("update", ts + 10, (1, "b", 0, "y"), {"v3": (7, None)}),
    ]
    batches = [
        Batch(tables=[(SCHEMA, [planned(m, n) for n, m in enumerate(part)])])
        for part in ([Mutation("delete_partition", ts, (1, "a"))], first)
    ]
    await apply_both(pair, batches, NOW)
    await assert_same_tables(pair, ["cdc_model"])
    cells = await pair[0].conn.fetchval(
        "SELECT _cdc_cells->>'v4' FROM cdc_model WHERE p1 = 0 AND p2 = 'a' AND c1 = 0 AND c2 = 'x'"
    )
    assert cells == f"[{ts - 1}, null]"
