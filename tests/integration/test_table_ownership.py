"""A target table belongs to one Cassandra table: two keyspaces whose tables share a name never
mix their rows in one target, whoever gets there first and however many workers race."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from cdc_sink.errors import PoisonError
from cdc_sink.model.cql import parse_cql_type
from cdc_sink.model.events import Cell, ChangeEvent, Op, Position
from cdc_sink.ops.migrate import migrate
from cdc_sink.schema.cassandra import CassandraTable
from cdc_sink.schema.catalog import Catalog
from tests.support.names import Unique
from tests.support.pipeline import (
    create_topic,
    json_with_schema,
    produce,
    read_topic,
    run_cli,
    run_worker,
    sink_env,
)
from tests.support.stack import Endpoints

USERS = {"id": "int32", "name": "string"}


def user(keyspace: str, i: int, name: str, *, op: str = "i") -> tuple[bytes, bytes]:
    cells = {"name": name} if op != "d" else {}
    return json_with_schema(keyspace, "users", USERS, {"id": i}, cells, op=op, ts_us=10**15 + i)


async def fetch(dsn: str, schema: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def test_a_second_keyspace_is_dead_lettered_and_flows_once_named_apart(
    stack: Endpoints, unique: Unique
) -> None:
    """`shop.users` makes `cdc_users`; then `crm.users` (same target under `cdc_{table}`):
    the worker warns at start-up, crm's inserts and deletes are dead-lettered naming both
    sources and the setting, shop's rows stay exactly shop's and keep flowing; with
    `{keyspace}` in the format, replayed crm records land in a table of their own."""
    prefix = unique("cdc-events-owner")
    shop, crm = unique("shop"), unique("crm")
    shop_topic, crm_topic = f"{prefix}-{shop}-users", f"{prefix}-{crm}-users"
    schema, group, dlq_topic = unique.schema("owner"), unique("g"), unique("dlq-events")
    for topic in (shop_topic, crm_topic):
        await create_topic(stack.kafka, topic)
    env = sink_env(stack, topic=shop_topic, group=group, schema=schema, dlq__topic=dlq_topic)
    env["CDC_CASSANDRA__CONTACT_POINTS"] = ""  # types from the records' own schemas
    # An installation that has run with shop alone: shop made (and owns) cdc_users.
    await produce(stack.kafka, shop_topic, [user(shop, i, f"shop{i}") for i in range(10)])
    first = await run_worker(env)

    # crm appears: same ids, other names, a delete of a row shop has.
    crm_records = [user(crm, i, f"crm{i}") for i in range(5)]
    crm_records.append(user(crm, 1, "", op="d"))
    await produce(stack.kafka, crm_topic, crm_records)
    await produce(stack.kafka, shop_topic, [user(shop, i, f"shop{i}") for i in range(10, 15)])
    env["CDC_KAFKA__TOPIC_PATTERN"] = f"^{re.escape(prefix)}-.*"
    second = await run_worker(env)

    rows = await fetch(stack.postgres_dsn, schema, "SELECT id, name FROM cdc_users")
    assert sorted(tuple(r) for r in rows) == [(i, f"shop{i}") for i in range(15)]
    owners = await fetch(
        stack.postgres_dsn,
        schema,
        "SELECT DISTINCT keyspace_name, source_table FROM _cdc_schema_metadata",
    )
    assert [tuple(r) for r in owners] == [(shop, "users")]
    letters = await fetch(
        stack.postgres_dsn,
        schema,
        "SELECT source_topic, error_class, stage, error_message FROM _cdc_dlq_records",
    )
    assert len(letters) == len(crm_records)
    for letter in letters:
        assert letter["source_topic"] == crm_topic
        assert (letter["error_class"], letter["stage"]) == ("TableOwnerError", "interpret")
        message = letter["error_message"]
        for part in (f"{shop}.users", f"{crm}.users", "cdc_users"):
            assert part in message
        assert "CDC_SINK__TABLE_NAME_FORMAT" in message
        assert "{keyspace}" in message
    in_topic = await read_topic(stack.kafka, dlq_topic)
    assert len(in_topic) == len(crm_records)
    stored = await fetch(
        stack.postgres_dsn, schema, "SELECT sum(next_offset) FROM _cdc_checkpoints"
    )
    assert stored[0][0] == 15 + len(crm_records)

    # The fix the message names: each keyspace its own table, then replay crm's records.
    env["CDC_SINK__TABLE_NAME_FORMAT"] = "cdc_{keyspace}_{table}"
    replayed = await asyncio.to_thread(
        run_cli, env, "dlq", "replay", "--error-class", "TableOwnerError", timeout=120
    )
    assert replayed.returncode == 0, replayed.stderr
    third = await run_worker(env)
    rows = await fetch(stack.postgres_dsn, schema, f'SELECT id, name FROM "cdc_{crm}_users"')
    assert sorted(tuple(r) for r in rows) == [(i, f"crm{i}") for i in range(5) if i != 1]
    rows = await fetch(stack.postgres_dsn, schema, "SELECT count(*) FROM cdc_users")
    assert rows[0][0] == 15
    collisions = [
        w.metrics.registry.get_sample_value("cdc_table_name_collisions")
        for w in (first, second, third)
    ]
    assert collisions == [0, 1, 0]


class UsersInCassandra:
    """Cassandra's system_schema as a worker reads it: every keyspace has a `users` table."""

    async def table(self, keyspace: str, table: str) -> CassandraTable | None:
        return CassandraTable(
            {"id": parse_cql_type("int"), "name": parse_cql_type("text")}, ("id",)
        )


def insert(keyspace: str, table: str) -> ChangeEvent:
    return ChangeEvent(
        keyspace=keyspace,
        table=table,
        op=Op.INSERT,
        key={"id": 1},
        cells={"name": Cell(keyspace, None)},
        ts_us=1,
        snapshot=False,
        position=Position("t", 0, 0),
    )


@pytest.fixture
async def two_pools(
    stack: Endpoints, unique: Unique
) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool, str]]:
    """Two pools (two workers' connections) on a fresh, migrated schema of their own."""
    schema = unique.schema("race")
    settings = {"search_path": schema}
    pools = [
        await asyncpg.create_pool(stack.postgres_dsn, server_settings=settings) for _ in range(2)
    ]
    try:
        async with pools[0].acquire() as conn:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await migrate(conn, schema)
        yield pools[0], pools[1], schema
    finally:
        for pool in pools:
            await pool.close()


async def test_two_workers_racing_for_a_new_table_leave_it_exactly_one_owner(
    two_pools: tuple[asyncpg.Pool, asyncpg.Pool, str],
) -> None:
    """Two workers resolve the first events of `shop.tN` and `crm.tN` at the same moment:
    for every table exactly one of them gets it, the other gets TableOwnerError, and the
    metadata records the winner alone."""
    pool_a, pool_b, schema = two_pools
    cassandra = UsersInCassandra()
    for n in range(12):
        table = f"t{n}"
        a = Catalog(pool_a, schema, "cdc_{table}", cassandra)
        b = Catalog(pool_b, schema, "cdc_{table}", cassandra)
        outcomes: list[Any] = await asyncio.gather(
            a.resolve(insert("shop", table), {}, {}),
            b.resolve(insert("crm", table), {}, {}),
            return_exceptions=True,
        )
        won = [o.keyspace for o in outcomes if not isinstance(o, BaseException)]
        lost = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(won) == 1, outcomes
        [refused] = lost
        assert type(refused).__name__ == "TableOwnerError", outcomes
        loser = "crm" if won == ["shop"] else "shop"
        assert f"is owned by {won[0]}.{table}" in str(refused)
        assert f"and {loser}.{table} maps to the same name" in str(refused)
        owners = await pool_a.fetch(
            "SELECT DISTINCT keyspace_name FROM _cdc_schema_metadata WHERE target_table = $1",
            f"cdc_{table}",
        )
        assert [r["keyspace_name"] for r in owners] == won
        # Once it lost, the loser keeps refusing (from its cache and from the metadata).
        with pytest.raises(PoisonError, match="owned by"):
            await (b if won == ["shop"] else a).resolve(insert(loser, table), {}, {})
        with pytest.raises(PoisonError, match="owned by"):
            await Catalog(pool_b, schema, "cdc_{table}", cassandra).resolve(
                insert(loser, table), {}, {}
            )
