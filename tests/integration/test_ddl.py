"""The catalog against real PostgreSQL: what a restarted worker knows of the tables it made."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from cdc_sink.ddl import CassandraTable, Catalog
from cdc_sink.events import Cell, ChangeEvent, Op, Position
from cdc_sink.migrate import migrate
from cdc_sink.types import parse_cql_type
from tests.support.stack import Endpoints

UDTS = {
    "address": [("street", "text"), ("zip", "varint"), ("geo", "frozen<tuple<double, double>>")],
    "person": [("name", "text"), ("homes", "frozen<list<frozen<address>>>")],
}
COLUMNS = {
    "id": parse_cql_type("int"),
    "owner": parse_cql_type("frozen<person>", UDTS),
    "visits": parse_cql_type("map<text, frozen<address>>", UDTS),
    "note": parse_cql_type("text"),
}


class FixedCassandra:
    """Cassandra's system_schema for one table (the types a worker would read from it)."""

    async def table(self, keyspace: str, table: str) -> CassandraTable | None:
        return CassandraTable(dict(COLUMNS), ("id",))


async def test_a_restarted_worker_rebuilds_udt_columns_with_their_fields(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """A table created with UDT columns (nested, inside collections) is loaded back by a new
    catalog with exactly the same column types, fields included, without asking Cassandra."""
    schema = unique("ddl")
    pool = await asyncpg.create_pool(stack.postgres_dsn, server_settings={"search_path": schema})
    try:
        async with pool.acquire() as conn:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await migrate(conn, schema)
        event = ChangeEvent(
            keyspace="ks",
            table="people",
            op=Op.INSERT,
            key={"id": 1},
            cells={"note": Cell("x", None)},
            ts_us=1,
            snapshot=False,
            position=Position("t", 0, 0),
        )
        created = await Catalog(pool, schema, "cdc_{table}", FixedCassandra()).resolve(
            event, {}, {}
        )
        assert created.columns == COLUMNS
        reloaded = await Catalog(pool, schema, "cdc_{table}", None).resolve(event, {}, {})
        assert reloaded.columns == COLUMNS
        assert reloaded.columns["owner"].fields[1][1].params[0].fields[0] == (
            "street",
            parse_cql_type("text"),
        )
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await pool.close()
