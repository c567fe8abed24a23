"""Re-masking: rewrite a table's masked columns after a rule change, from Cassandra's values.

PostgreSQL does not keep the clear value of a masked column, so a new rule, a rotated hash key
or a removed rule is applied to the rows already written by reading each row's value (and its
WRITETIME) from Cassandra and writing what the sink writes for it now. The table is walked in
primary-key order in small batches; each batch is written in one transaction that holds the
table's exclusive advisory lock (the lock every sink writer of the table takes shared first),
so no batch of the sink interleaves with it, and the cursor in `_cdc_mask_progress` moves in
that same transaction: an interrupted run resumes after the last batch it committed.

A cell is rewritten only where PostgreSQL holds that same write or an older one (its
`_cdc_cells` timestamp is at most Cassandra's WRITETIME); a newer stored cell came from an event
the sink applied after the read, already under the new rules. The sink must run with the new
rules before this starts (README "PII masking"), or it would write clear values behind it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from cdc_recon.canonical import for_postgres, key_text
from cdc_recon.errors import InvalidRequestError
from cdc_recon.readers import CassandraReader, ReconTable
from cdc_sink.errors import ConversionError
from cdc_sink.model.cql import pg_type
from cdc_sink.schema.catalog import retype_masked
from cdc_sink.schema.tables import lock_id, qualified, quote_ident

DEFAULT_BATCH_ROWS = 500


@dataclass(frozen=True)
class RemaskOutcome:
    """What one `mask apply` run did."""

    table: str
    columns: tuple[str, ...]
    rows_done: int  # rows walked so far by this fingerprint's run, earlier runs included
    rows_written: int  # rows whose masked columns were rewritten (same)
    finished: bool
    resumed: bool


def fingerprint(table: ReconTable, columns: Sequence[str]) -> str:
    """What the rewrite depends on: the rules of `columns`, the marker, and a check value of
    the hash key (an HMAC of a constant: it tells keys apart without revealing them)."""
    parts: list[str] = []
    for column in columns:
        mask = table.masks.get(column)
        if mask is None:
            parts.append(f"{column}=clear")
            continue
        key_check = hmac.new(mask.key, b"cdc-sink key check", hashlib.sha256).hexdigest()
        rules = ",".join(rule.text for rule in mask.rules)
        parts.append(f"{rules}|{mask.marker}|{key_check[:16]}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class Remasker:
    """Rewrites the masked columns of one table (see the module's docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        pg_schema: str,
        cassandra: CassandraReader,
        table: ReconTable,
        columns: Sequence[str] = (),
        *,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ) -> None:
        chosen = tuple(dict.fromkeys((*table.masks, *columns)))
        unknown = [c for c in chosen if c not in table.value_columns]
        if unknown:
            raise InvalidRequestError(
                f"{table.target} has no column {unknown[0]!r} outside its primary key"
            )
        if not chosen:
            raise InvalidRequestError(
                f"no masking rule names a column of {table.keyspace}.{table.source}, and no "
                "--column was given: nothing to rewrite"
            )
        self.pool = pool
        self.pg_schema = pg_schema
        self.cassandra = cassandra
        self.table = table
        self.columns = chosen
        self.batch_rows = batch_rows
        self.fingerprint = fingerprint(table, chosen)
        self.schema = table.sink_schema()
        self._target = qualified(pg_schema, table.target)
        self._keys_sql, self._update_sql = self._statements()

    def _statements(self) -> tuple[str, str]:
        table = self.table
        keys = [quote_ident(k) for k in table.key_columns]
        cursor = []
        for name in table.key_columns:
            t = pg_type(table.columns[name])
            field = f"$1::jsonb -> {_literal(name)}"
            cursor.append(field if t == "jsonb" else f"(($1::jsonb ->> {_literal(name)})::{t})")
        pairs = ", ".join(f"{_literal(k)}, {quote_ident(k)}" for k in table.key_columns)
        select = (
            f"SELECT {', '.join(keys)}, jsonb_build_object({pairs})::text AS cursor "
            f"FROM {self._target} WHERE $1::jsonb IS NULL OR ({', '.join(keys)}) > "
            f"({', '.join(cursor)}) ORDER BY {', '.join(keys)} LIMIT $2"
        )
        sets, cells = [], "_cdc_cells"
        width = len(table.key_columns)
        for i, name in enumerate(self.columns):
            value, stamp = f"${width + 2 * i + 1}", f"${width + 2 * i + 2}::bigint"
            stored = f"(_cdc_cells -> {_literal(name)} ->> 0)::bigint"
            older = f"coalesce({stored}, -1) <= {stamp}"
            cast = self.schema.column_type(name)
            sets.append(
                f"{quote_ident(name)} = CASE WHEN {older} THEN {value}::{cast} "
                f"ELSE {quote_ident(name)} END"
            )
            cells = (
                f"{cells} || CASE WHEN {older} THEN jsonb_build_object({_literal(name)}, "
                f"jsonb_build_array({stamp}, _cdc_cells -> {_literal(name)} -> 1)) "
                "ELSE '{}'::jsonb END"
            )
        where = " AND ".join(f"{k} = ${i + 1}" for i, k in enumerate(keys))
        update = f"UPDATE {self._target} SET {', '.join(sets)}, _cdc_cells = {cells} WHERE {where}"
        return select, update

    async def run(self, *, restart: bool = False, max_batches: int | None = None) -> RemaskOutcome:
        """Walk the table from where the last run of the same fingerprint stopped (from the
        start if `restart`, or the rules changed), at most `max_batches` batches. A column a
        `hash` rule stores as text is made text first, if no sink pod has done so yet."""
        await retype_masked(self.pool, self.pg_schema, self.schema)
        cursor, done, written, resumed, finished = await self._start(restart)
        batches = 0
        while not finished and (max_batches is None or batches < max_batches):
            rows = await self.pool.fetch(self._keys_sql, cursor, self.batch_rows)
            if not rows:
                await self.pool.execute(
                    "UPDATE _cdc_mask_progress SET finished_at = now(), updated_at = now() "
                    "WHERE target_table = $1",
                    self.table.target,
                )
                finished = True
                break
            changed = await self._rewrite(rows)
            cursor = rows[-1]["cursor"]
            done, written, batches = done + len(rows), written + changed, batches + 1
        return RemaskOutcome(self.table.target, self.columns, done, written, finished, resumed)

    async def _start(self, restart: bool) -> tuple[str | None, int, int, bool, bool]:
        """(cursor, rows done, rows written, resumed, finished) of this fingerprint's run."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT fingerprint, last_key::text AS last_key, rows_done, rows_written, "
                "finished_at FROM _cdc_mask_progress WHERE target_table = $1 FOR UPDATE",
                self.table.target,
            )
            if row is not None and row["fingerprint"] == self.fingerprint and not restart:
                finished = row["finished_at"] is not None
                return row["last_key"], row["rows_done"], row["rows_written"], True, finished
            await conn.execute(
                "INSERT INTO _cdc_mask_progress (target_table, fingerprint, columns) "
                "VALUES ($1, $2, $3) ON CONFLICT (target_table) DO UPDATE SET "
                "fingerprint = excluded.fingerprint, columns = excluded.columns, "
                "last_key = NULL, rows_done = 0, rows_written = 0, started_at = now(), "
                "updated_at = now(), finished_at = NULL",
                self.table.target,
                self.fingerprint,
                list(self.columns),
            )
        return None, 0, 0, False, False

    async def _rewrite(self, rows: Sequence[asyncpg.Record]) -> int:
        """Rewrite one batch of keys; the number of rows Cassandra still has (and so were
        written)."""
        width = len(self.table.key_columns)
        canon_key = self.table.key_canon(for_postgres)
        canon = [canon_key(row) for row in rows]
        found = await self.cassandra.fetch_native(self.table, canon)
        updates = []
        for row, key in zip(rows, canon, strict=True):
            native = found.get(key_text(key))
            if native is None:
                continue  # gone from Cassandra: the sink's delete (or a repair) removes it
            params: list[Any] = [row[i] for i in range(width)]
            for name in self.columns:
                params += self._cell(name, native.values.get(name), native.writetimes.get(name))
            updates.append(params)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_id(self.table.target))
            if updates:
                await conn.executemany(self._update_sql, updates)
            await conn.execute(
                "UPDATE _cdc_mask_progress SET last_key = $2::jsonb, rows_done = rows_done + $3, "
                "rows_written = rows_written + $4, updated_at = now() WHERE target_table = $1",
                self.table.target,
                rows[-1]["cursor"],
                len(rows),
                len(updates),
            )
        return len(updates)

    def _cell(self, name: str, value: Any, written: int | None) -> list[Any]:
        """(value, timestamp) parameters of one cell; a null timestamp leaves it as it is
        (null in Cassandra, or an unmasked value the sink could not store either). A masked
        value the sink cannot store empties the cell: what PostgreSQL holds there is an older
        value, written before the rule, in the clear."""
        if value is None or written is None:
            return [None, None]
        try:
            return [self.schema.converters[name](value), written]
        except ConversionError:
            return [None, written] if name in self.table.masks else [None, None]


def _literal(text: str) -> str:
    """A SQL string literal (for column names used as JSON keys)."""
    return "'" + text.replace("'", "''") + "'"
