"""GDPR erasure: remove one key's (or one partition's) rows and every trace the sink keeps of
them, and keep them erased.

One transaction, holding the partition's advisory lock the writer takes (writer.py), so a batch
in flight either commits first and is erased with the rest, or sees the suppression entry and
skips the key (suppression.py): the target rows (their per-cell metadata is in them), the
tombstones that carry the key, the reconciliation mismatches and the dead letters of the key go,
the key's HMAC joins `_cdc_erased_keys`, and `_cdc_audit_log` records who asked, what was
erased (the key's hash, never its values) and how many rows went.

Used by POST /gdpr/erasures, GET /gdpr/erasures/{id} and `python -m cdc_sink gdpr erase|show`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, ConfigDict

from cdc_sink.apply.suppression import PARTITION, ROW, by_value, key_hash, record_key
from cdc_sink.apply.writer import json_key
from cdc_sink.config import Secret
from cdc_sink.decode.decoder import Decoder
from cdc_sink.errors import SinkError
from cdc_sink.model.cql import CqlType, pg_type
from cdc_sink.model.events import Key
from cdc_sink.ops.audit import audit
from cdc_sink.ops.auth import ERASE, READ, Authenticator, Principal, require
from cdc_sink.ops.http import ApiError, JsonRoute, json_response, whole
from cdc_sink.ops.pools import BoundedPool
from cdc_sink.schema.catalog import stored_schema
from cdc_sink.schema.tables import TableSchema, lock_id, qualified, quote_ident

DLQ_PAGE = 1000
ERASURES = "\x00gdpr erasures"  # with the table's name: the lock that orders its erasures
ERASURE_COLUMNS = (
    "id, target_table, scope, encode(key_hash, 'hex') AS key_hash, status, requested_by, "
    "requested_at, completed_at, erased"
)


class ErasureError(ValueError):
    """The request names a key that is neither the table's primary key nor its partition
    key, or a value that does not fit its column."""


class UnknownTableError(ErasureError):
    """The request names a table the sink never made."""


# How reconciliation renders a key's values as a mismatch's `row_key` (the composition root
# passes cdc_recon's: the sink does not import reconciliation).
MismatchKey = Callable[[Mapping[str, CqlType], Sequence[str], Key], str]


@dataclass(frozen=True)
class ErasedKey:
    """What one request erases: a row's full key or a partition key, as PostgreSQL values."""

    schema: TableSchema
    scope: str  # ROW or PARTITION
    columns: tuple[str, ...]
    values: Key

    @property
    def text(self) -> str:
        return json_key(self.values)

    def covers(self, key: Key) -> bool:
        """Whether a full key of the table is this row, or in this partition."""
        return tuple(key[: len(self.values)]) == self.values


def erased_key(schema: TableSchema, key: Mapping[str, Any]) -> ErasedKey:
    """The request's key, converted as the sink converts event keys: the primary key names a
    row, the partition key (its columns exactly) the whole partition. ErasureError otherwise."""
    partition = schema.partition_columns
    names = set(key)
    if partition is not None and names == set(partition):
        scope, columns = PARTITION, partition
    elif names == set(schema.key_columns):
        scope, columns = ROW, schema.key_columns
    else:
        wanted = f"its primary key ({', '.join(schema.key_columns)})"
        if partition is not None:
            wanted += f" or its partition key ({', '.join(partition)})"
        raise ErasureError(f"the key of {schema.target} must name {wanted}, not {sorted(names)}")
    values = []
    for column in columns:
        raw = key[column]
        if raw is None:
            raise ErasureError(f"key column {column!r} cannot be null")
        try:
            values.append(schema.converters[column](raw))
        except (SinkError, ValueError, TypeError) as exc:
            raise ErasureError(f"key column {column!r}: {exc}") from None
    return ErasedKey(schema, scope, columns, tuple(values))


async def erase(
    conn: asyncpg.Connection,
    pg_schema: str,
    target: str,
    key: Mapping[str, Any],
    *,
    hash_key: Secret,
    decoder: Decoder,
    actor: str,
    mismatch_key: MismatchKey | None = None,
) -> dict[str, Any]:
    """Erase `key` of table `target` (see the module's docstring) and return the erasure's
    record. UnknownTableError, or ErasureError for a key that is not the table's; asyncpg's
    errors otherwise (nothing is erased then)."""
    schema = await stored_schema(conn, target)
    if schema is None:
        raise UnknownTableError(f"no table {target!r} is known to the sink (_cdc_schema_metadata)")
    gone = erased_key(schema, key)
    digest = key_hash(hash_key, target, gone.scope, json_key(by_value(gone.values)))
    # Most dead letters are read before the locks, so the writer waits only for those since.
    letters = await _dead_letters(conn, gone, decoder)
    async with conn.transaction():
        await _lock(conn, gone)
        erasure_id = await conn.fetchval(
            "INSERT INTO _cdc_erasures (target_table, scope, key_hash, status, requested_by) "
            "VALUES ($1, $2, $3, 'running', $4) RETURNING id",
            target,
            gone.scope,
            digest,
            actor,
        )
        await conn.execute(
            "INSERT INTO _cdc_erased_keys (target_table, scope, key_hash, erasure_id) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (target_table, scope, key_hash) DO NOTHING",
            target,
            gone.scope,
            digest,
            erasure_id,
        )
        counts = {
            "rows": await _delete_rows(conn, pg_schema, gone),
            "tombstones": await _delete_tombstones(conn, gone),
            "mismatches": await _delete_mismatches(conn, gone, mismatch_key),
            "dead_letters": await _delete_dead_letters(conn, gone, decoder, letters),
        }
        await conn.execute(
            "UPDATE _cdc_erasures SET status = 'completed', completed_at = now(), erased = $2 "
            "WHERE id = $1",
            erasure_id,
            json.dumps(counts),
        )
        await audit(
            conn,
            actor,
            "gdpr_erase",
            {
                "erasure_id": erasure_id,
                "table": target,
                "scope": gone.scope,
                "key_hash": digest.hex(),
                "erased": counts,
            },
        )
    found = await erasure(conn, erasure_id)
    assert found is not None
    return found


async def erasure(conn: asyncpg.Connection | BoundedPool, erasure_id: int) -> dict[str, Any] | None:
    """The record of erasure `erasure_id`, None if there is none."""
    row = await conn.fetchrow(
        f"SELECT {ERASURE_COLUMNS} FROM _cdc_erasures WHERE id = $1", erasure_id
    )
    if row is None:
        return None
    found = dict(row)
    found["erased"] = json.loads(found["erased"])
    return found


async def _lock(conn: asyncpg.Connection, gone: ErasedKey) -> None:
    """The writer's locks for this key: the table's shared lock, then its partition's; the
    table's exclusive lock while the sink has not learnt its partition key."""
    schema = gone.schema
    table_lock = lock_id(schema.target)
    if schema.partition_columns is None:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", table_lock)  # excludes erasures too
        return
    partition = json_key(gone.values[: len(schema.partition_columns)])
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", table_lock)
    await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_id(schema.target, partition))
    # Erasures of one table commit in the order of their `_cdc_erased_keys` ids, so a writer
    # that has seen an id has seen every lower one of the table (suppression.py).
    await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_id(schema.target, ERASURES))


async def _delete_rows(conn: asyncpg.Connection, pg_schema: str, gone: ErasedKey) -> int:
    schema = gone.schema
    where = " AND ".join(
        f"{quote_ident(c)} = ${i + 1}::{pg_type(schema.columns[c])}"
        for i, c in enumerate(gone.columns)
    )
    status = await conn.execute(
        f"DELETE FROM {qualified(pg_schema, schema.target)} WHERE {where}", *gone.values
    )
    return int(status.split()[-1])


def _prefix(column: str, width: int) -> str:
    """SQL for the first `width` elements of a JSON-array key column."""
    return "jsonb_build_array(" + ", ".join(f"{column} -> {i}" for i in range(width)) + ")"


async def _delete_tombstones(conn: asyncpg.Connection, gone: ErasedKey) -> int:
    """A row's tombstone (it carries the key and the cells' timestamps), and for a partition
    its partition and range tombstones and its rows' tombstones."""
    if gone.scope == ROW:
        condition = "kind = 'row' AND partition_key = $2::jsonb"
    else:
        condition = (
            "(kind IN ('partition', 'range') AND partition_key = $2::jsonb) OR "
            f"(kind = 'row' AND {_prefix('partition_key', len(gone.values))} = $2::jsonb)"
        )
    status = await conn.execute(
        f"DELETE FROM _cdc_tombstones WHERE target_table = $1 AND ({condition})",
        gone.schema.target,
        gone.text,
    )
    return int(status.split()[-1])


async def _delete_mismatches(
    conn: asyncpg.Connection, gone: ErasedKey, mismatch_key: MismatchKey | None
) -> int:
    """Reconciliation mismatches whose key is the key or starts with the partition key, as
    reconciliation renders it (`mismatch_key`; without it, as the sink does, which agrees for
    text, integers and uuids)."""
    schema = gone.schema
    text = gone.text
    if mismatch_key is not None:
        text = mismatch_key(schema.columns, schema.key_columns, gone.values)
    status = await conn.execute(
        "DELETE FROM _cdc_reconciliation_mismatches WHERE target_table = $1 AND "
        f"{_prefix('row_key', len(gone.values))} = $2::jsonb",
        schema.target,
        text,
    )
    return int(status.split()[-1])


async def _delete_dead_letters(
    conn: asyncpg.Connection, gone: ErasedKey, decoder: Decoder, earlier: _Letters
) -> int:
    """Delete the dead letters of the key: those `earlier` found before the locks, and those
    it did not read (stored since, or committed since by a transaction then in flight)."""
    since = await _dead_letters(conn, gone, decoder, earlier.read)
    status = await conn.execute(
        "DELETE FROM _cdc_dlq_records WHERE id = ANY($1::bigint[])", earlier.doomed + since.doomed
    )
    return int(status.split()[-1])


@dataclass
class _Letters:
    doomed: list[int]  # the key's
    read: list[int]  # every id read


async def _dead_letters(
    conn: asyncpg.Connection, gone: ErasedKey, decoder: Decoder, read: Sequence[int] = ()
) -> _Letters:
    """The dead letters whose record key is the key (or in the partition), leaving out the ids
    in `read`: their key is decoded as the worker decodes it, and must name exactly the
    table's key columns; a letter whose value names another table is not the key's. A key
    that cannot be decoded cannot be told, and is left to retention."""
    schema = gone.schema
    found = _Letters([], [])
    after = 0
    while True:
        rows = await conn.fetch(
            "SELECT d.id, d.record_key, d.record_value FROM _cdc_dlq_records d "
            "LEFT JOIN unnest($3::bigint[]) AS known(id) ON known.id = d.id "
            "WHERE d.id > $1 AND d.record_key IS NOT NULL AND known.id IS NULL "
            "ORDER BY d.id LIMIT $2",
            after,
            DLQ_PAGE,
            list(read),
        )
        if not rows:
            return found
        after = rows[-1]["id"]
        for row in rows:
            found.read.append(row["id"])
            key = await _record_key(schema, decoder, row["record_key"], row["record_value"])
            if key is not None and gone.covers(key):
                found.doomed.append(row["id"])


async def _record_key(
    schema: TableSchema, decoder: Decoder, raw_key: bytes, raw_value: bytes | None
) -> Key | None:
    """The record's key as PostgreSQL values, None if it is not a key of this table."""
    try:
        decoded = await decoder.decode(raw_key, None)
    except SinkError:
        return None
    if raw_value is not None:
        try:
            source = ((await decoder.decode(None, raw_value)).value or {}).get("source")
        except SinkError:
            source = None
        if isinstance(source, Mapping) and (source.get("keyspace"), source.get("table")) != (
            schema.keyspace,
            schema.table,
        ):
            return None
    return record_key(schema, decoded.key)


class ErasureBody(BaseModel):
    """POST /gdpr/erasures: the target table and the key, {"column": value} for each column
    of the primary key (one row) or of the partition key (the whole partition)."""

    model_config = ConfigDict(extra="forbid")
    table: str
    key: dict[str, Any]


def gdpr_routes(
    pool: BoundedPool,
    auth: Authenticator,
    pg_schema: str,
    hash_key: Secret | None,
    decoder: Decoder,
    mismatch_key: MismatchKey | None = None,
) -> APIRouter:
    """POST /gdpr/erasures (cdc:erase; 201 with the erasure's record, audited) and
    GET /gdpr/erasures/{id} (cdc:read)."""
    router = APIRouter(route_class=JsonRoute, tags=["gdpr"])
    eraser = Depends(require(auth, ERASE))
    reader = Depends(require(auth, READ))

    @router.post("/gdpr/erasures")
    async def request_erasure(body: ErasureBody, caller: Principal = eraser) -> Response:
        if hash_key is None:
            raise ApiError(503, "erasure needs CDC_GDPR__HASH_KEY (or CDC_VAULT__GDPR_HASH_KEY)")
        try:
            async with pool.acquire() as conn:
                done = await erase(
                    conn,
                    pg_schema,
                    body.table,
                    body.key,
                    hash_key=hash_key,
                    decoder=decoder,
                    actor=caller.subject,
                    mismatch_key=mismatch_key,
                )
        except ErasureError as exc:
            status = 404 if isinstance(exc, UnknownTableError) else 400
            raise ApiError(status, str(exc)) from None
        return json_response(done, status=201)

    @router.get("/gdpr/erasures/{erasure_id}")
    async def show(
        erasure_id: Annotated[int, whole("id"), Path()], _: Principal = reader
    ) -> Response:
        found = await erasure(pool, erasure_id)
        if found is None:
            raise ApiError(404, f"no erasure {erasure_id}")
        return json_response(found)

    return router
