"""Schema evolution: create each target table on first sight, add columns as they appear.

Column types come from, in order: what this table already has (`_cdc_schema_metadata`),
Cassandra's own `system_schema` when a Cassandra connection is configured (exact: it tells
inet from text, time from bigint, decimal from double), and the schema the record carried
(Avro, or JSON with schemas.enable=true). A schemaless record for a column none of those
knows is rejected (dead-lettered) with a message saying so.

DDL runs in its own short transaction under an advisory lock per table, with IF NOT EXISTS
everywhere, so several workers seeing the same new table or column at once all succeed.

A target table belongs to the Cassandra table (keyspace and table) it was made for, as every
version in `_cdc_schema_metadata` records: the first version is written under that same lock,
so of workers racing to make one target for two sources exactly one makes it, and the other's
events are refused (TableOwnerError, dead-lettered).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import asyncpg

from cdc_sink.errors import EventError, FatalError, TransientError
from cdc_sink.model.cql import (
    CqlType,
    from_connect_schema,
    parse_cql_type,
    pg_type,
    udt_definitions,
)
from cdc_sink.model.events import ChangeEvent
from cdc_sink.model.masking import MaskingError, MaskingPolicy, as_text, is_text
from cdc_sink.model.scalars import text_rendering
from cdc_sink.schema.cassandra import CassandraTable, describe_table
from cdc_sink.schema.tables import (
    RESERVED_COLUMNS,
    ReservedColumnError,
    TableSchema,
    lock_id,
    qualified,
    quote_ident,
    refuse_reserved,
    require_owner,
    target_name,
)


class CassandraTypes(Protocol):
    """Where Cassandra's own column types come from (system_schema)."""

    async def table(self, keyspace: str, table: str) -> CassandraTable | None: ...


class Catalog:
    """Knows every target table's TableSchema; creates and alters tables as events demand."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        table_format: str,
        cassandra: CassandraTypes | None = None,
        masking: MaskingPolicy | None = None,
    ) -> None:
        self.pool = pool
        self.masking = masking or MaskingPolicy()
        self.schema = schema
        self.table_format = table_format
        self.cassandra = cassandra
        self._tables: dict[str, TableSchema] = {}
        self._by_source: dict[tuple[str, str], TableSchema] = {}  # (keyspace, table) -> latest
        self._locks: dict[str, asyncio.Lock] = {}
        # (keyspace, table) seen to have a reserved column name -> why its events are refused
        self._refused: dict[tuple[str, str], str] = {}

    def tables(self) -> list[TableSchema]:
        """The tables resolved so far by this process."""
        return list(self._tables.values())

    def known(self, keyspace: str, table: str) -> TableSchema | None:
        """The schema the events of keyspace.table resolved to last, if any: what `resolve`
        returns for an event of it whose cells all name its columns."""
        return self._by_source.get((keyspace, table))

    async def resolve(
        self,
        event: ChangeEvent,
        key_schemas: Mapping[str, Mapping[str, Any]],
        column_schemas: Mapping[str, Mapping[str, Any]],
    ) -> TableSchema:
        """The schema that holds this event's columns, evolving the table first if needed.

        Poison (the record is dead-lettered, nothing is made): ReservedColumnError if the
        event's Cassandra table has a column the target cannot take (from then on for every
        event of that table), TableOwnerError if its target table belongs to another Cassandra
        table, EventError if a column's type is unknown."""
        source = (event.keyspace, event.table)
        known = self._by_source.get(source)
        if known is not None and event.cells.keys() <= known.columns.keys():
            return known  # the per-record path: no name formatting, no await
        refused = self._refused.get(source)
        if refused is not None:
            raise ReservedColumnError(refused)
        try:
            return await self._resolve(event, key_schemas, column_schemas)
        except ReservedColumnError as exc:
            self._refused[source] = str(exc)
            self._by_source.pop(source, None)
            raise

    async def _resolve(
        self,
        event: ChangeEvent,
        key_schemas: Mapping[str, Mapping[str, Any]],
        column_schemas: Mapping[str, Mapping[str, Any]],
    ) -> TableSchema:
        # The record's own schemas list every column of the table: a reserved name among them
        # refuses the table at first sight, without asking Cassandra.
        columns = (*event.key, *event.cells, *key_schemas, *column_schemas)
        refuse_reserved(event.keyspace, event.table, columns)
        target = target_name(self.table_format, event.keyspace, event.table)
        async with self._locks.setdefault(target, asyncio.Lock()):
            known = self._tables.get(target) or await self._load(target)
            if known is not None:
                require_owner(known, event.keyspace, event.table, self.table_format)
            if known is not None and all(c in known.columns for c in event.cells):
                if target not in self._tables:
                    known = await self._retype(known)
                self._tables[target] = self._by_source[event.keyspace, event.table] = known
                return known
            cassandra = (
                await self.cassandra.table(event.keyspace, event.table)
                if self.cassandra is not None
                else None
            )
            types = self._types_for(event, cassandra, key_schemas, column_schemas)
            if known is not None:
                types = {n: t for n, t in types.items() if n not in known.columns}
            partitions = cassandra.partition_columns if cassandra else None
            with _refusal_is_fatal(f"create or change table {target!r} in schema {self.schema!r}"):
                evolved = await self._evolve(target, event, types, partitions)
            evolved = await self._retype(self._masked(evolved))
            self._tables[target] = self._by_source[event.keyspace, event.table] = evolved
            return evolved

    def _types_for(
        self,
        event: ChangeEvent,
        cassandra: CassandraTable | None,
        key_schemas: Mapping[str, Mapping[str, Any]],
        column_schemas: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, CqlType]:
        """Every column type the sources know (Cassandra's first): a new table gets all of its
        columns at once. Each column of the event must be among them. Raises
        ReservedColumnError if Cassandra's table has a column of a reserved name."""
        types: dict[str, CqlType] = {}
        unusable: dict[str, str] = {}  # the record's schema for the column is not understood
        for name, schema in {**column_schemas, **key_schemas}.items():
            try:
                types[name] = from_connect_schema(schema)
            except ValueError as exc:
                unusable[name] = str(exc)
        if cassandra is not None:
            types.update(cassandra.columns)
        refuse_reserved(event.keyspace, event.table, types)
        missing = [n for n in (*event.key, *event.cells) if n not in types]
        if missing:
            where = f"column(s) {', '.join(map(repr, missing))} of {event.keyspace}.{event.table}"
            bad = [f"{n!r}: {unusable[n]}" for n in missing if n in unusable]
            if cassandra is not None:
                bad += [
                    f"{n!r}: Cassandra's type {cassandra.unsupported[n]!r} is not supported"
                    for n in missing
                    if n in cassandra.unsupported and n not in unusable
                ]
            if bad:
                raise EventError(f"no usable type for {where}: {'; '.join(bad)}")
            raise EventError(
                f"no type known for {where}: the record carries no schema and neither "
                "the target table nor Cassandra's system_schema has them"
            )
        return types

    async def _load(self, target: str) -> TableSchema | None:
        schema = await stored_schema(self.pool, target)
        if schema is None:
            return None
        schema = self._masked(schema)
        rendered = rendered_columns(schema, await column_types(self.pool, self.schema, target))
        return schema.with_masks(schema.masks, rendered) if rendered else schema

    async def _retype(self, schema: TableSchema) -> TableSchema:
        """`schema`, once retype_masked made its hashed columns text in PostgreSQL."""
        with _refusal_is_fatal(f"change masked columns of table {schema.target!r} to text"):
            await retype_masked(self.pool, self.schema, schema)
        return schema

    def _masked(self, schema: TableSchema) -> TableSchema:
        """`schema` converting through its masking rules. A rule that does not fit the table
        stops the worker (FatalError naming the rule): writing the column unmasked is not an
        option, and no record can fix the settings."""
        try:
            masks = self.masking.masks(
                schema.keyspace, schema.table, schema.columns, schema.key_columns
            )
        except MaskingError as exc:
            raise FatalError(f"{exc} (CDC_MASKING__RULES)", stage="catalog") from None
        return schema.with_masks(masks) if masks or schema.masks else schema

    async def _evolve(
        self,
        target: str,
        event: ChangeEvent,
        types: dict[str, CqlType],
        partition_columns: tuple[str, ...] | None,
    ) -> TableSchema:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_id("ddl", target))
            current = await self._load(target)  # another worker may have evolved it meanwhile
            if current is not None:  # or made it, for a source of the same target name
                require_owner(current, event.keyspace, event.table, self.table_format)
            if current is None:
                key = tuple(event.key)
                ordered = {n: types[n] for n in key} | {
                    n: t for n, t in types.items() if n not in key
                }
                schema = TableSchema(
                    event.keyspace, event.table, target, key, ordered, partition_columns
                )
                await conn.execute(schema.create_sql(self.schema))
                await conn.execute(schema.expiry_index_sql(self.schema))
            else:
                schema = current.with_columns(types)
                for name in schema.columns:
                    if name not in current.columns:
                        await conn.execute(schema.add_column_sql(self.schema, name))
            if current is None or schema.version != current.version:
                await conn.execute(
                    "INSERT INTO _cdc_schema_metadata (target_table, version, keyspace_name, "
                    "source_table, key_columns, partition_columns, columns, udts) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb) ON CONFLICT DO NOTHING",
                    target,
                    schema.version,
                    schema.keyspace,
                    schema.table,
                    list(schema.key_columns),
                    list(schema.partition_columns) if schema.partition_columns else None,
                    json.dumps({n: str(t) for n, t in schema.columns.items()}),
                    json.dumps(udt_definitions(schema.columns.values())),
                )
            return schema


@contextlib.contextmanager
def _refusal_is_fatal(what: str) -> Iterator[None]:
    """PostgreSQL refusing DDL (SQLSTATE class 42: no CREATE on the schema, a column of the
    same name made by hand, …) as a FatalError saying what was refused: no record can fix
    it, and skipping would lose data. Other errors (connection, lock, …) pass on, retried."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        if not (exc.sqlstate or "").startswith("42"):
            raise
        raise FatalError(
            f"PostgreSQL refused to {what} ({exc.sqlstate} {type(exc).__name__}: {exc})",
            stage="catalog",
        ) from exc


async def column_types(
    db: asyncpg.Pool | asyncpg.Connection, schema: str, target: str
) -> dict[str, str]:
    """The PostgreSQL type of each column of schema.target, as format_type names it
    ("bigint", "text[]", "timestamp with time zone"); empty if there is no such table."""
    rows = await db.fetch(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type FROM pg_attribute a "
        "WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        qualified(schema, target),
    )
    return {row["attname"]: row["type"] for row in rows}


async def retype_masked(pool: asyncpg.Pool, pg_schema: str, schema: TableSchema) -> list[str]:
    """Make each column a `hash` rule of `schema` stores as text text in PostgreSQL too, and
    return the columns changed: a rule added to a table whose column is, say, bigint changes
    the column to text, its values cast to text (in the clear until `mask apply` rewrites
    them). The ALTER runs in one transaction under the table's DDL lock and then its writer
    lock taken exclusively, so it waits for the sink's transactions on the table (every pod's
    writer takes that lock shared) and they wait for it; a pod that finds the column text
    already changes nothing. asyncpg's errors as they come."""
    if not schema.masks or not schema.retyped(await column_types(pool, pg_schema, schema.target)):
        return []
    target = qualified(pg_schema, schema.target)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_id("ddl", schema.target))
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_id(schema.target))
        retyped = schema.retyped(await column_types(conn, pg_schema, schema.target))
        for name, want in retyped.items():
            column = quote_ident(name)
            await conn.execute(
                f"ALTER TABLE {target} ALTER COLUMN {column} TYPE {want} USING {column}::{want}"
            )
    return list(retyped)


def rendered_columns(schema: TableSchema, actual: Mapping[str, str]) -> frozenset[str]:
    """The unmasked columns of `schema` that PostgreSQL holds as text though their Cassandra
    type is not text: a `hash` rule made them text, and it has been removed since. The sink
    then writes their values' canonical text, in the clear (README "PII masking")."""
    return frozenset(
        name
        for name, t in schema.columns.items()
        if name not in schema.masks
        and name not in schema.key_columns
        and not is_text(t)
        and text_rendering(t) is not None
        and actual.get(name) == pg_type(as_text(t))
    )


async def stored_schema(db: asyncpg.Pool | asyncpg.Connection, target: str) -> TableSchema | None:
    """The newest recorded schema of `target` (None if the sink never made it)."""
    row = await db.fetchrow(
        "SELECT version, keyspace_name, source_table, key_columns, partition_columns, "
        "columns::text AS columns, udts::text AS udts FROM _cdc_schema_metadata "
        "WHERE target_table = $1 "
        "ORDER BY version DESC LIMIT 1",
        target,
    )
    if row is None:
        return None
    # jsonb does not keep key order: put the key columns first again, as at creation.
    stored = json.loads(row["columns"])
    keys = list(row["key_columns"])
    # An earlier release recorded a reserved name it had "added" (ADD COLUMN IF NOT EXISTS
    # passed over the sink's own column): that column is the sink's, not the source's.
    order = keys + sorted(n for n in stored if n not in keys and n not in RESERVED_COLUMNS)
    udts = json.loads(row["udts"]) if row["udts"] else None
    columns = {n: parse_cql_type(stored[n], udts) for n in order}
    return TableSchema(
        keyspace=row["keyspace_name"],
        table=row["source_table"],
        target=target,
        key_columns=tuple(row["key_columns"]),
        columns=columns,
        partition_columns=tuple(row["partition_columns"] or ()) or None,
        version=row["version"],
    )


class CassandraSystemSchema:
    """Column types read from Cassandra's system_schema through cassandra-driver."""

    def __init__(self, session_factory: Callable[[], Any]) -> None:
        self._session_factory = session_factory
        self._session: Any = None

    async def table(self, keyspace: str, table: str) -> CassandraTable | None:
        """The table's schema, None if Cassandra has no such table; TransientError while
        Cassandra cannot answer (the caller retries with backoff, then stops)."""
        from cassandra import InvalidRequest, OperationTimedOut, RequestExecutionException
        from cassandra.cluster import NoHostAvailable

        try:
            return await asyncio.to_thread(self._table, keyspace, table)
        except ValueError as exc:  # a key column of a type the sink cannot map
            raise EventError(f"cannot use Cassandra's schema of {keyspace}.{table}: {exc}") from exc
        except InvalidRequest as exc:  # the names the record gave make no valid query
            raise EventError(f"Cassandra refused to look up the record's table: {exc}") from exc
        except (NoHostAvailable, OperationTimedOut, RequestExecutionException) as exc:
            raise TransientError(
                f"Cassandra (CDC_CASSANDRA__*) cannot tell the columns of {keyspace}.{table}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    async def close(self) -> None:
        if self._session is not None:
            await asyncio.to_thread(self._session.cluster.shutdown)
            self._session = None

    def _table(self, keyspace: str, table: str) -> CassandraTable | None:
        if self._session is None:
            self._session = self._session_factory()
        return describe_table(self._session, keyspace, table)
