"""The catalog against real PostgreSQL: what a restarted worker knows of the tables it made."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from cdc_sink.apply.writer import PgWriter
from cdc_sink.model.cql import parse_cql_type
from cdc_sink.model.events import Cell, ChangeEvent, Op, Position
from cdc_sink.ops.migrate import migrate
from cdc_sink.schema.cassandra import CassandraTable
from cdc_sink.schema.catalog import Catalog
from cdc_sink.schema.tables import expiry_index_name, qualified, quote_ident
from tests.support.names import Unique
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


@pytest.fixture
async def migrated(stack: Endpoints, unique: Unique) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    """A pool on a fresh, migrated schema of its own (dropped after the test)."""
    schema = unique.schema("ddl")
    pool = await asyncpg.create_pool(stack.postgres_dsn, server_settings={"search_path": schema})
    try:
        async with pool.acquire() as conn:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await migrate(conn, schema)
        yield pool, schema
    finally:
        await pool.close()


def insert_into(table: str) -> ChangeEvent:
    return ChangeEvent(
        keyspace="ks",
        table=table,
        op=Op.INSERT,
        key={"id": 1},
        cells={"note": Cell("x", None)},
        ts_us=1,
        snapshot=False,
        position=Position("t", 0, 0),
    )


async def test_a_restarted_worker_rebuilds_udt_columns_with_their_fields(
    migrated: tuple[asyncpg.Pool, str],
) -> None:
    """A table created with UDT columns (nested, inside collections) is loaded back by a new
    catalog with exactly the same column types, fields included, without asking Cassandra."""
    pool, schema = migrated
    event = insert_into("people")
    created = await Catalog(pool, schema, "cdc_{table}", FixedCassandra()).resolve(event, {}, {})
    assert created.columns == COLUMNS
    reloaded = await Catalog(pool, schema, "cdc_{table}", None).resolve(event, {}, {})
    assert reloaded.columns == COLUMNS
    assert reloaded.columns["owner"].fields[1][1].params[0].fields[0] == (
        "street",
        parse_cql_type("text"),
    )


async def test_the_expiry_task_reads_an_index_that_migration_004_adds_to_older_tables(
    migrated: tuple[asyncpg.Pool, str],
) -> None:
    """Every created table has a partial index on `_cdc_expires_at`, and the expiry task's
    query uses it instead of scanning the table; a table made before the index existed (index
    dropped, migration 004 not yet applied) gets it from the migration."""
    pool, schema = migrated
    table = await Catalog(pool, schema, "cdc_{table}", FixedCassandra()).resolve(
        insert_into('Ex"piry'), {}, {}
    )
    index = expiry_index_name(table.target)
    target = qualified(schema, table.target)
    async with pool.acquire() as conn:

        async def definition() -> str | None:
            found: str | None = await conn.fetchval(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND indexname = $2",
                schema,
                index,
            )
            return found

        async def index_scans() -> int:
            await conn.execute("SELECT pg_stat_force_next_flush()")
            scans: int = await conn.fetchval(
                "SELECT idx_scan FROM pg_stat_user_indexes "
                "WHERE schemaname = $1 AND indexrelname = $2",
                schema,
                index,
            )
            return scans

        created = await definition()
        assert created is not None
        assert created.endswith("USING btree (_cdc_expires_at) WHERE (_cdc_expires_at IS NOT NULL)")

        await conn.execute(f"INSERT INTO {target} (id) SELECT g FROM generate_series(1, 20000) g")
        await conn.execute(
            f"UPDATE {target} SET _cdc_expires_at = now() - interval '1 hour' WHERE id <= 3"
        )
        await conn.execute(f"ANALYZE {target}")
        before = await index_scans()
        assert await PgWriter(conn, schema, "g").expire_due(table) == 3
        assert await index_scans() > before
        assert await conn.fetchval(f"SELECT count(*) FROM {target}") == 20000 - 3

        await conn.execute(f'DROP INDEX "{schema}".{quote_ident(index)}')
        await conn.execute(
            f'DELETE FROM "{schema}"._cdc_migrations WHERE version = $1', "004_expiry_index"
        )
        assert await migrate(conn, schema) == ["004_expiry_index"]
        assert await definition() == created
