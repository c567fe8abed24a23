"""Which table to reconcile: a name resolved to a table the sink writes (PostgreSQL's
`_cdc_schema_metadata` and columns) and, for a job, to Cassandra's exact column types."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from cdc_recon.errors import InvalidRequestError, ReconError, UnknownTableError
from cdc_recon.readers import ReconTable
from cdc_sink.model.masking import MaskingError, MaskingPolicy
from cdc_sink.ops.pools import BoundedPool
from cdc_sink.schema import cassandra
from cdc_sink.schema.catalog import column_types, rendered_columns
from cdc_sink.schema.tables import RESERVED_COLUMNS


@dataclass(frozen=True, slots=True)
class Target:
    """A table the sink writes: its PostgreSQL name, its Cassandra source, and the columns
    PostgreSQL has (with their types)."""

    target: str
    keyspace: str
    source: str
    types: Mapping[str, str]


async def find_target(
    conn: asyncpg.Connection | asyncpg.Pool | BoundedPool, pg_schema: str, name: str
) -> Target:
    """Find `name` (a target table, or a Cassandra table name if exactly one target has it)
    in `_cdc_schema_metadata`, from PostgreSQL alone. UnknownTableError if it is not a table
    the sink writes."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (target_table) target_table, keyspace_name, source_table "
        "FROM _cdc_schema_metadata WHERE target_table = $1 OR source_table = $1 "
        "ORDER BY target_table, version DESC",
        name,
    )
    rows = [r for r in rows if r["target_table"] == name] or rows
    if not rows:
        raise UnknownTableError(f"unknown table {name!r}: the sink has written no such table")
    if len(rows) > 1:
        names = ", ".join(r["target_table"] for r in rows)
        raise UnknownTableError(f"table name {name!r} is ambiguous: it matches {names}")
    row = rows[0]
    types = await column_types(conn, pg_schema, row["target_table"])
    if not types:
        raise UnknownTableError(f"table {pg_schema}.{row['target_table']} does not exist")
    return Target(row["target_table"], row["keyspace_name"], row["source_table"], types)


async def resolve_table(
    conn: asyncpg.Connection | asyncpg.Pool | BoundedPool,
    pg_schema: str,
    session: Any,
    name: str,
    masking: MaskingPolicy | None = None,
) -> ReconTable:
    """find_target, then Cassandra's system_schema for the table's exact types.
    UnknownTableError if it is not a table the sink writes, or Cassandra no longer has it;
    InvalidRequestError naming the masking rule that does not fit the table."""
    found = await find_target(conn, pg_schema, name)
    keyspace, source = found.keyspace, found.source
    try:
        described = await asyncio.to_thread(cassandra.describe_table, session, keyspace, source)
    except Exception as exc:
        raise ReconError(f"cannot read Cassandra's schema of {keyspace}.{source}: {exc}") from exc
    if described is None:
        raise UnknownTableError(f"Cassandra has no table {keyspace}.{source}")
    columns, partition = described.columns, described.partition_columns
    clustering = described.clustering_columns
    keys = (*partition, *clustering)
    # A Cassandra column of a reserved name is not in the target, even where the target has
    # a column of that name (the sink's own): it is Cassandra's alone, like a missing one.
    mirrored = found.types.keys() - RESERVED_COLUMNS
    ordered = {c: columns[c] for c in keys} | {
        c: t for c, t in columns.items() if c not in keys and c in mirrored
    }
    try:
        masks = (masking or MaskingPolicy()).masks(keyspace, source, ordered, keys)
    except MaskingError as exc:
        raise InvalidRequestError(str(exc)) from None
    table = ReconTable(
        masks=masks,
        target=found.target,
        keyspace=keyspace,
        source=source,
        key_columns=keys,
        partition_columns=partition,
        columns=ordered,
        cassandra_only=tuple(c for c in columns if c not in mirrored),
    )
    return dataclasses.replace(table, rendered=rendered_columns(table.sink_schema(), found.types))
