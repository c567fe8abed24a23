"""Write: apply one batch to PostgreSQL in one transaction, checkpoints included.

Per batch and target table: take advisory locks (a partition at a time, so a partition delete
consumed by one worker and row events consumed by another serialise), load the stored state of
every touched key and partition, merge (plan.py), then binary-COPY the live rows into a TEMP
staging table and upsert them, delete rows that died, keep the tombstones that still matter,
record dead letters, and move each Kafka partition's checkpoint with a compare-and-set on its
fencing epoch and previous offset. Either all of it commits or none of it.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import asyncpg

from cdc_sink.apply.codecs import PG_TUPLE_CODECS
from cdc_sink.apply.plan import (
    CellState,
    FreshRow,
    PartitionTombstones,
    RangeTombstone,
    RowState,
    TablePlan,
    TableState,
    apply_mutations,
    settle_fresh,
    settle_plan,
    write_and_expiry,
)
from cdc_sink.apply.suppression import Suppression
from cdc_sink.dlq.letters import DeadLetter, headers_to_json
from cdc_sink.errors import FencedError
from cdc_sink.model.cql import CqlType, pg_type
from cdc_sink.model.events import Key, Mutation, Op
from cdc_sink.schema.tables import (
    META_COLUMNS,
    TableSchema,
    lock_id,
    lock_ids,
    qualified,
    quote_ident,
)

_SCOPES_KEPT = 65_536
_NEXT_DLQ_ID = "nextval(pg_get_serial_sequence('_cdc_dlq_records', 'id'))"


@dataclass(frozen=True)
class CheckpointMove:
    """Advance (group, topic, partition) from `expected` to `next_offset` under `epoch`."""

    topic: str
    partition: int
    expected: int
    next_offset: int
    epoch: int


@dataclass
class Batch:
    """Everything one transaction applies."""

    tables: list[tuple[TableSchema, list[Mutation]]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    checkpoints: list[CheckpointMove] = field(default_factory=list)


@dataclass(frozen=True)
class BatchResult:
    duration_s: float
    suppressed: dict[str, int]  # erased keys' mutations, by table
    # Dead letters of erased keys found under the keys' locks: not stored (suppression.py).
    erased_letters: tuple[DeadLetter, ...]


def json_key(values: tuple[Any, ...]) -> str:
    """The canonical JSON text of a key's PostgreSQL values (stable across load and event):
    exactly `json.dumps([_jsonable(v) ...], separators=(",", ":"))`, which every worker version
    must agree on (advisory-lock ids derive from it). Rendered value by value, as a batch
    renders every key it touches and json.dumps' machinery costs several times more."""
    return "[" + ",".join(map(_json_value, values)) + "]"


_json_str = json.encoder.encode_basestring_ascii  # json.dumps' own str rendering (C)


def _json_value(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return _json_str(value)
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if isinstance(value, uuid.UUID):
        return f'"{value}"'
    return json.dumps(_jsonable(value))


class _KeyTexts(dict[Key, str]):
    """json_key of the keys of one table in one batch, each rendered once.

    Keyed by the bare tuple: within one table a position always holds one column's type, so
    values that are equal but render differently (1, 1.0, True) cannot meet."""

    def __missing__(self, key: Key) -> str:
        text = self[key] = json_key(key)
        return text


def keys_in(
    columns: Mapping[str, CqlType], names: Sequence[str], keys: Iterable[Key]
) -> tuple[str, list[list[Any]]]:
    """A `(names) IN (…)` condition matching these keys' PostgreSQL values, and its array
    parameters (one per column of `names`, typed from `columns`, $1…)."""
    idents = ", ".join(quote_ident(n) for n in names)
    arrays = ", ".join(f"${i + 1}::{pg_type(columns[n])}[]" for i, n in enumerate(names))
    return (
        f"({idents}) IN (SELECT * FROM unnest({arrays}))",
        [list(c) for c in zip(*keys, strict=True)],
    )


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


async def prepare_connection(conn: asyncpg.Connection) -> None:
    """Per-connection setup: exact codecs for dates and timestamps at the ends of their range
    (asyncpg's defaults would store year 1 and 9999-12-31 as ±infinity)."""
    for name, (encoder, decoder) in PG_TUPLE_CODECS.items():
        await conn.set_type_codec(
            name, schema="pg_catalog", encoder=encoder, decoder=decoder, format="tuple"
        )


class PgWriter:
    """Applies batches on one connection set up by `prepare_connection` (its codecs also
    take the writer's own timestamps as µs since 1970); one instance per worker."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        schema: str,
        consumer_group: str,
        suppression: Suppression | None = None,
        *,
        fresh_rows_direct: bool = True,
    ) -> None:
        """`fresh_rows_direct` False sends every row through the general merge, which the
        direct path for rows one write makes from nothing must match exactly (tests compare)."""
        self.conn = conn
        self.suppression = suppression or Suppression(None)
        self.schema = schema
        self.group = consumer_group
        self.fresh_rows_direct = fresh_rows_direct
        self._staging: dict[str, int] = {}  # target -> schema version of its staging table
        self._partition_columns: dict[str, tuple[str, ...]] = {}  # learned, never changes
        self._scopes: dict[tuple[str, tuple[str, ...] | None, str], RangeTombstone] = {}

    async def apply(self, batch: Batch, now_us: int | None = None) -> BatchResult:
        """Apply the batch atomically; raise FencedError if a checkpoint moved under us."""
        began = time.perf_counter()
        now = now_us if now_us is not None else time.time_ns() // 1000
        keyed = _keyed_letters(batch.dead_letters)
        suppressed: dict[str, int] = {}
        try:
            async with self.conn.transaction():
                for schema, mutations in batch.tables:
                    letters = keyed.get(schema.target, (schema, []))[1]
                    also = [key for key, _ in letters]
                    if dropped := await self._apply_table(schema, mutations, now, also_lock=also):
                        suppressed[schema.target] = dropped
                erased = await self._erased_letters(keyed, {s.target for s, _ in batch.tables})
                gone = {id(letter) for letter in erased}
                await self._dead_letters([d for d in batch.dead_letters if id(d) not in gone])
                await self._move_checkpoints(batch.checkpoints)
        except BaseException:
            self._staging.clear()  # a staging table created in the rolled-back transaction is gone
            raise
        return BatchResult(time.perf_counter() - began, suppressed, tuple(erased))

    async def erased_letters(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """Those of `letters` whose row key an erasure covers, read outside a transaction: one
        look-up per table (suppression.py). An erasure may still commit after it; `apply` looks
        again under the keys' locks before it stores a letter."""
        return await self._erased_letters(_keyed_letters(letters), set())

    async def _erased_letters(self, keyed: _Keyed, locked: set[str]) -> list[DeadLetter]:
        """The letters of erased keys. In `apply`, the tables not in `locked` have their keys'
        partitions locked first, as an erasure locks them: an erasure then either committed
        before (and its entry is seen here) or waits for this transaction (and its scan of
        `_cdc_dlq_records` finds the letters stored)."""
        erased: list[DeadLetter] = []
        for target, (schema, letters) in keyed.items():
            keys = [key for key, _ in letters]
            if self.conn.is_in_transaction() and target not in locked:
                await self._lock(schema, [], [], _KeyTexts(), keys)
            gone = await self.suppression.erased(
                self.conn, target, keys, json_key, await self._known_partition_columns(schema)
            )
            erased += [letter for key, letter in letters if key in gone]
        return erased

    async def expire_due(self, schema: TableSchema, limit: int = 1000) -> int:
        """Re-settle up to `limit` rows whose TTL has passed, so no expired row stays visible;
        return how many were due. Safe to run from several workers at once."""
        now = time.time_ns() // 1000
        keys = ", ".join(quote_ident(k) for k in schema.key_columns)
        due = await self.conn.fetch(
            f"SELECT {keys} FROM {qualified(self.schema, schema.target)} "
            "WHERE _cdc_expires_at <= $1 LIMIT $2",
            _EPOCH + dt.timedelta(microseconds=now),
            limit,
        )
        if due:
            touch = [tuple(r[k] for k in schema.key_columns) for r in due]
            async with self.conn.transaction():
                await self._apply_table(schema, [], now, touch)
        return len(due)

    async def prune_tombstones(self, grace_seconds: int) -> int:
        """Forget tombstones older than the grace period (like Cassandra's gc_grace_seconds)."""
        horizon = time.time_ns() // 1000 - grace_seconds * 1_000_000
        status = await self.conn.execute("DELETE FROM _cdc_tombstones WHERE ts_us < $1", horizon)
        return int(status.split()[-1])

    async def _apply_table(
        self,
        schema: TableSchema,
        mutations: list[Mutation],
        now_us: int,
        touch: Sequence[Key] = (),
        *,
        also_lock: Sequence[Key] = (),
    ) -> int:
        """Return how many mutations of erased keys were left out (suppression.py).
        `also_lock`: keys of the batch's dead letters of the table, whose partitions are
        locked with the rows' (in one id order, so writers never wait on each other in turn)."""
        texts = _KeyTexts()
        deletes = [m for m in mutations if m.event.op is Op.RANGE or m.event.is_partition_delete]
        partition_columns = await self._lock(
            schema, mutations, deletes, texts, [*touch, *also_lock]
        )
        state = TableState(schema.key_columns, partition_columns)
        erased_version = await self._load(schema, state, mutations, deletes, texts, touch)
        suppressed = 0
        if erased_version:
            gone = await self.suppression.erased(
                self.conn,
                schema.target,
                [m.key for m in mutations],
                json_key,  # not `texts`: it may hold an equal key's other rendering (12.340, 12.34)
                partition_columns,
                erased_version,
            )
            kept = [m for m in mutations if m.key not in gone]
            suppressed, mutations = len(mutations) - len(kept), kept
        fresh: dict[Key, FreshRow] = {}
        if self.fresh_rows_direct:
            mutations = _take_fresh(state, mutations, deletes, now_us, fresh)
        plan = apply_mutations(state, mutations)
        for key in touch:  # rows to re-settle though no event touched them (expiry)
            if key in state.rows:
                plan.rows[key] = state.rows[key]
        outcome = settle_plan(state, plan, now_us)
        if partition_columns is None and state.partition_columns is not None:
            await self.conn.execute(
                "UPDATE _cdc_schema_metadata SET partition_columns = $2 "
                "WHERE target_table = $1 AND partition_columns IS NULL",
                schema.target,
                list(state.partition_columns),
            )
            self._partition_columns[schema.target] = state.partition_columns
        await self._upsert(schema, outcome.live, fresh, now_us)
        await self._delete_rows(schema, [*outcome.remembered, *outcome.removed])
        await self._store_tombstones(schema, plan, outcome.remembered, texts)
        revived = [k for k in (*outcome.live, *outcome.removed) if k in state.remembered]
        await self._forget_dead(schema, [texts[k] for k in revived])
        return suppressed

    # locking --------------------------------------------------------------------------------

    async def _lock(
        self,
        schema: TableSchema,
        mutations: list[Mutation],
        deletes: list[Mutation],
        texts: _KeyTexts,
        touch: Sequence[Key] = (),
    ) -> tuple[str, ...] | None:
        """Serialise writers of the same Cassandra partitions; return the partition columns.
        `deletes` are the partition and range deletes among `mutations`."""
        partition_columns = await self._known_partition_columns(schema)
        table_lock = lock_id(schema.target)
        if partition_columns is None:
            # A batch that teaches the table's partition key excludes every other writer.
            shared = "" if deletes else "_shared"
            await self.conn.execute(f"SELECT pg_advisory_xact_lock{shared}($1)", table_lock)
            return None
        width = len(partition_columns)
        partitions = {texts[m.key[:width]] for m in mutations}
        partitions |= {texts[key[:width]] for key in touch}
        ids = ",".join(map(str, sorted(lock_ids(schema.target, partitions))))
        # The table's shared lock, then each partition's in id order: two statements in one
        # round trip (a simple query; the ids are our own integers, safe to write inline).
        await self.conn.execute(
            f"SELECT pg_advisory_xact_lock_shared({table_lock}); "
            f"SELECT pg_advisory_xact_lock(id) FROM unnest('{{{ids}}}'::bigint[]) AS id ORDER BY id"
        )
        return partition_columns

    async def _known_partition_columns(self, schema: TableSchema) -> tuple[str, ...] | None:
        known = schema.partition_columns or self._partition_columns.get(schema.target)
        if known:
            return known
        found = await self.conn.fetchval(
            "SELECT partition_columns FROM _cdc_schema_metadata WHERE target_table = $1 "
            "AND partition_columns IS NOT NULL ORDER BY version DESC LIMIT 1",
            schema.target,
        )
        if not found:
            return None
        known = self._partition_columns[schema.target] = tuple(found)
        return known

    # loading --------------------------------------------------------------------------------

    async def _load(
        self,
        schema: TableSchema,
        state: TableState,
        mutations: list[Mutation],
        deletes: list[Mutation],
        texts: _KeyTexts,
        touch: Sequence[Key] = (),
    ) -> int:
        """Load what the merge needs into `state`; return the table's erasure version (see
        suppression.py), read in the same statement as the tombstones."""
        # What the merge reads of a stored row (not the timestamps kept for people and the
        # expiry task).
        loaded = ", ".join(quote_ident(c) for c in [*schema.columns, *_MERGED_META])
        select = f"SELECT {loaded} FROM {qualified(self.schema, schema.target)}"
        row_keys = {m.key for m in mutations if None not in m.key} | set(touch)
        deleted_partitions: dict[Key, tuple[str, ...]] = {
            tuple(v for v in m.key if v is not None): tuple(
                n for n, v in zip(schema.key_columns, m.key, strict=True) if v is not None
            )
            for m in deletes
        }
        records: list[asyncpg.Record] = []
        if row_keys:
            records += await self._select_by(schema, select, schema.key_columns, row_keys)
        for partition, names in deleted_partitions.items():
            records += await self._select_by(schema, select, names, {partition})
        for record in records:
            key = tuple(record[name] for name in schema.key_columns)
            state.rows[key] = _row_from_record(record)
        by_json = {texts[k]: k for k in row_keys}
        partitions: set[str] = set()
        if state.partition_columns is not None:
            width = len(state.partition_columns)
            partitions = {texts[k[:width]] for k in row_keys}
            partitions |= {texts[p] for p in deleted_partitions}
        if not by_json and not partitions:
            return 0  # only deletes of a table whose partition key is unknown: none erased
        found = await self.conn.fetch(
            _STORED_TOMBSTONES, schema.target, list(by_json), list(partitions)
        )
        erased_version = 0
        parsed: dict[str, Key] = {}  # a partition's stones share its key text
        for stone in found:
            kind, text, ts = stone["kind"], stone["k"], stone["ts_us"]
            if kind == "erased":
                erased_version = ts
                continue
            if kind == "row":
                dead = by_json.get(json.dumps(json.loads(text), separators=(",", ":")))
                if dead is not None:
                    state.remembered.add(dead)
                    if dead not in state.rows:
                        state.rows[dead] = _row_from_state(json.loads(stone["state"]))
                continue
            if text not in parsed:
                parsed[text] = tuple(
                    _from_json(schema, name, value)
                    for name, value in zip(
                        state.partition_columns or (), json.loads(text), strict=True
                    )
                )
            entry = state.partitions.setdefault(parsed[text], PartitionTombstones())
            if kind == "partition":
                entry.partition_ts = max(entry.partition_ts or ts, ts)
            else:
                entry.ranges.append(self._range(schema, state, stone["scope"], ts))
        return erased_version

    def _range(self, schema: TableSchema, state: TableState, scope: str, ts: int) -> RangeTombstone:
        """A stored range tombstone; its scope parsed once per process (partitions keep their
        range tombstones for the grace period and every batch touching one reloads them)."""
        memo = (schema.target, state.partition_columns, scope)
        parsed = self._scopes.get(memo)
        if parsed is None:
            if len(self._scopes) >= _SCOPES_KEPT:
                self._scopes.clear()
            assert state.partition_columns is not None
            clustering = [c for c in schema.key_columns if c not in state.partition_columns]
            bounds = json.loads(scope)
            value = functools.partial(_from_json, schema)  # of a clustering column
            parsed = self._scopes[memo] = RangeTombstone(
                start=tuple(map(value, clustering, bounds["start"])),
                start_inclusive=bounds["start_inclusive"],
                end=tuple(map(value, clustering, bounds["end"])),
                end_inclusive=bounds["end_inclusive"],
                ts=0,
                descending=tuple(bounds["descending"]),
            )
        return replace(parsed, ts=ts)

    async def _select_by(
        self, schema: TableSchema, select: str, names: Sequence[str], keys: set[Key]
    ) -> list[asyncpg.Record]:
        where, columns = keys_in(schema.columns, names, keys)
        return list(await self.conn.fetch(f"{select} WHERE {where} FOR UPDATE", *columns))

    # storing --------------------------------------------------------------------------------

    async def _staging_table(self, schema: TableSchema) -> str:
        name = f"_cdc_stage_{lock_id(schema.target) & 0xFFFFFFFF:08x}"
        if self._staging.get(schema.target) == schema.version:
            return name
        await self.conn.execute(f"DROP TABLE IF EXISTS pg_temp.{name}")
        await self.conn.execute(
            f"CREATE TEMP TABLE {name} (LIKE {qualified(self.schema, schema.target)} "
            "INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        self._staging[schema.target] = schema.version
        return name

    async def _upsert(
        self,
        schema: TableSchema,
        live: dict[Key, RowState],
        fresh: dict[Key, FreshRow],
        now_us: int,
    ) -> None:
        if not live and not fresh:
            return
        staging = await self._staging_table(schema)
        columns = [*schema.columns, *META_COLUMNS]
        values = schema.value_columns
        # The timestamptz columns get µs since 1970 (see codecs.PG_TUPLE_CODECS); updated_at is
        # the wall clock even when a caller simulates `now_us`.
        updated_at = time.time_ns() // 1000
        records = [
            (
                *key,
                *[None if (c := row.cells.get(name)) is None else c.value for name in values],
                _stamps_json((n, c.ts, c.expires_us) for n, c in row.cells.items()),
                row.marker_ts,
                row.marker_expires_us,
                row.deleted_ts,
                *write_and_expiry(row, now_us),
                updated_at,
            )
            for key, row in live.items()
        ]
        records += [
            (
                *key,
                *map(new.values.get, values),
                _stamps_json(new.stamps),
                new.marker_ts,
                new.marker_expires_us,
                None,
                new.write_ts,
                new.next_expiry,
                updated_at,
            )
            for key, new in fresh.items()
        ]
        order = [*schema.key_columns, *values, *META_COLUMNS]
        await self.conn.copy_records_to_table(staging, records=records, columns=order)
        idents = ", ".join(quote_ident(c) for c in columns)
        keys = ", ".join(quote_ident(k) for k in schema.key_columns)
        updates = ", ".join(
            f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}"
            for c in columns
            if c not in schema.key_columns
        )
        await self.conn.execute(
            f"INSERT INTO {qualified(self.schema, schema.target)} ({idents}) "
            f"SELECT {idents} FROM pg_temp.{staging} "
            f"ON CONFLICT ({keys}) DO UPDATE SET {updates}"
        )

    async def _delete_rows(self, schema: TableSchema, keys: list[Key]) -> None:
        if not keys:
            return
        where, columns = keys_in(schema.columns, schema.key_columns, keys)
        await self.conn.execute(
            f"DELETE FROM {qualified(self.schema, schema.target)} WHERE {where}", *columns
        )

    async def _store_tombstones(
        self,
        schema: TableSchema,
        plan: TablePlan,
        remembered: dict[Key, RowState],
        texts: _KeyTexts,
    ) -> None:
        # One row per (kind, key, scope), at its newest timestamp: the statement below may not
        # touch a row twice (two range tombstones of one scope can differ only in timestamp).
        rows: dict[tuple[str, str, str], tuple[str | None, int]] = {}

        def add(kind: str, key: str, scope: str, state: str | None, ts: int) -> None:
            known = rows.get((kind, key, scope))
            if known is None or ts > known[1]:
                rows[kind, key, scope] = (state, ts)

        for partition, ts in plan.new_partition_tombstones.items():
            add("partition", texts[partition], "[]", None, ts)
        for partition, stone in plan.new_range_tombstones:
            add("range", texts[partition], _range_scope(stone), None, stone.ts)
        for key, row in remembered.items():
            newest = max(
                [c.ts for c in row.cells.values()] + [row.deleted_ts or 0, row.marker_ts or 0]
            )
            add("row", texts[key], "[]", _row_state_json(row), newest)
        if not rows:
            return
        await self.conn.execute(
            "INSERT INTO _cdc_tombstones (target_table, kind, partition_key, scope, state, ts_us) "
            "SELECT $1, s.kind, s.key, s.scope, s.state, s.ts "
            "FROM unnest($2::text[], $3::jsonb[], $4::jsonb[], $5::jsonb[], $6::bigint[]) "
            "AS s(kind, key, scope, state, ts) "
            "ON CONFLICT (target_table, kind, partition_key, scope) DO UPDATE SET "
            "state = EXCLUDED.state, ts_us = GREATEST(_cdc_tombstones.ts_us, EXCLUDED.ts_us), "
            "recorded_at = now()",
            schema.target,
            [kind for kind, _, _ in rows],
            [key for _, key, _ in rows],
            [scope for _, _, scope in rows],
            [state for state, _ in rows.values()],
            [ts for _, ts in rows.values()],
        )

    async def _forget_dead(self, schema: TableSchema, keys: list[str]) -> None:
        """Delete the row tombstones of keys (as json_key texts) that live again."""
        if not keys:
            return
        await self.conn.execute(
            "DELETE FROM _cdc_tombstones t USING unnest($2::jsonb[]) AS gone(key) "
            "WHERE t.target_table = $1 AND t.kind = 'row' AND t.partition_key = gone.key",
            schema.target,
            keys,
        )

    async def _dead_letters(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        await self.conn.executemany(
            "INSERT INTO _cdc_dlq_records (id, source_topic, source_partition, source_offset, "
            "record_key, record_value, headers, error_class, error_message, stage, schema_id, "
            f"failed_at) VALUES (coalesce($1, {_NEXT_DLQ_ID}), $2, $3, $4, $5, $6, $7::jsonb, "
            "$8, $9, $10, $11, $12) "
            "ON CONFLICT (source_topic, source_partition, source_offset) DO NOTHING",
            [
                (
                    d.dlq_id,
                    d.topic,
                    d.partition,
                    d.offset,
                    d.key,
                    d.value,
                    headers_to_json(d.headers),
                    d.error_class,
                    d.message,
                    d.stage,
                    d.schema_id,
                    d.failed_at,
                )
                for d in letters
            ],
        )

    async def _move_checkpoints(self, moves: list[CheckpointMove]) -> None:
        """Every partition's compare-and-set in one statement (a batch spans many partitions);
        FencedError names a partition whose checkpoint or epoch is no longer what we hold."""
        if not moves:
            return
        moved = await self.conn.fetch(
            "UPDATE _cdc_checkpoints c SET next_offset = m.next_offset, updated_at = now() "
            "FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::bigint[]) "
            "AS m(topic, kafka_partition, next_offset, epoch, expected) "
            "WHERE c.consumer_group = $1 AND c.topic = m.topic "
            "AND c.kafka_partition = m.kafka_partition AND c.epoch = m.epoch "
            "AND c.next_offset = m.expected RETURNING c.topic, c.kafka_partition",
            self.group,
            [m.topic for m in moves],
            [m.partition for m in moves],
            [m.next_offset for m in moves],
            [m.epoch for m in moves],
            [m.expected for m in moves],
        )
        done = {(r["topic"], r["kafka_partition"]) for r in moved}
        for move in moves:
            if (move.topic, move.partition) not in done:
                raise FencedError(
                    f"{move.topic}[{move.partition}] is no longer ours at offset {move.expected} "
                    f"(epoch {move.epoch}): another worker took it over"
                )


# target -> (its schema, (row key, letter) of each of its letters)
_Keyed = dict[str, tuple[TableSchema, list[tuple[Key, DeadLetter]]]]


def _keyed_letters(letters: Sequence[DeadLetter]) -> _Keyed:
    """The letters whose table and key are known, by target table."""
    keyed: _Keyed = {}
    for letter in letters:
        if letter.row is not None:
            schema, key = letter.row
            keyed.setdefault(schema.target, (schema, []))[1].append((key, letter))
    return keyed


async def reserve_dlq_ids(pool: asyncpg.Pool, count: int) -> list[int]:
    """`count` fresh `_cdc_dlq_records` ids, for dead letters whose DLQ message must name
    their row before the transaction that inserts it (an id whose transaction never commits
    stays unused)."""
    rows = await pool.fetch(f"SELECT {_NEXT_DLQ_ID} FROM generate_series(1, $1)", count)
    return [row[0] for row in rows]


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# The dead rows among a batch's keys ($2) and the partition and range tombstones of its
# partitions ($3), in one round trip.
_STORED_TOMBSTONES = (
    "SELECT t.kind, t.partition_key::text AS k, t.state, t.scope, t.ts_us "
    "FROM unnest($2::jsonb[]) AS wanted(key) JOIN _cdc_tombstones t "
    "ON t.target_table = $1 AND t.kind = 'row' AND t.partition_key = wanted.key "
    "UNION ALL "
    "SELECT t.kind, t.partition_key::text, t.state, t.scope, t.ts_us "
    "FROM unnest($3::jsonb[]) AS wanted(key) JOIN _cdc_tombstones t "
    "ON t.target_table = $1 AND t.kind IN ('partition', 'range') "
    "AND t.partition_key = wanted.key "
    # The table's erasure version (suppression.py), from the last page of its index.
    "UNION ALL SELECT 'erased', NULL, NULL, NULL, coalesce(max(e.id), 0) "
    "FROM _cdc_erased_keys e WHERE e.target_table = $1"
)
_MERGED_META = ("_cdc_cells", "_cdc_marker_ts", "_cdc_marker_expires_us", "_cdc_deleted_ts")


def _row_from_record(record: asyncpg.Record) -> RowState:
    stamps = json.loads(record["_cdc_cells"])  # jsonb: asyncpg hands over its text
    cells = {name: CellState(record[name], ts, expires) for name, (ts, expires) in stamps.items()}
    return RowState(
        cells, record["_cdc_marker_ts"], record["_cdc_marker_expires_us"], record["_cdc_deleted_ts"]
    )


@functools.lru_cache(maxsize=4096)
def _json_name(name: str) -> str:
    return json.dumps(name)


def _stamps_json(stamps: Iterable[tuple[str, int, int | None]]) -> str:
    """`_cdc_cells` from (column, write ts, expiry or None): {column: [write ts, expiry or
    null]}, written without json.dumps (this runs for every upserted row)."""
    return (
        "{"
        + ",".join(
            f"{_json_name(n)}:[{ts},{'null' if expires is None else expires}]"
            for n, ts, expires in stamps
        )
        + "}"
    )


def _take_fresh(
    state: TableState,
    mutations: list[Mutation],
    deletes: list[Mutation],
    now_us: int,
    fresh: dict[Key, FreshRow],
) -> list[Mutation]:
    """Settle directly (`plan.settle_fresh`) the live rows that one INSERT or UPDATE makes
    from nothing: its key is written once in the batch, nothing of it is stored and no
    partition or range tombstone of its partition is stored or in the batch. Fill `fresh`
    with them and return the mutations left for the general merge, in their order (`deletes`:
    the partition and range deletes among them)."""
    if deletes and state.partition_columns is None:
        return mutations  # the batch teaches the partition key: nothing to tell apart yet
    blocked = set(state.partitions)
    blocked.update(tuple(v for v in m.key if v is not None) for m in deletes)
    width = len(state.partition_columns) if blocked and state.partition_columns else 0
    writes = Counter(m.key for m in mutations)
    stored = state.rows
    rest: list[Mutation] = []
    for mutation in mutations:
        key = mutation.key
        op = mutation.event.op
        if (
            writes[key] == 1
            and (op is Op.INSERT or op is Op.UPDATE)
            and key not in stored
            and not (width and key[:width] in blocked)
        ):
            new = settle_fresh(mutation, now_us)
            if new is not None:
                fresh[key] = new
                continue
        rest.append(mutation)
    return rest


def _row_state_json(row: RowState) -> str:
    # A remembered row is dead: its cells are nulls, so only their timestamps matter.
    return json.dumps(
        {
            "cells": {n: [c.ts, c.expires_us] for n, c in row.cells.items()},
            "marker": [row.marker_ts, row.marker_expires_us],
            "deleted_ts": row.deleted_ts,
        }
    )


def _row_from_state(state: dict[str, Any]) -> RowState:
    cells = {n: CellState(None, ts, exp) for n, (ts, exp) in state["cells"].items()}
    marker_ts, marker_expires = state["marker"]
    return RowState(cells, marker_ts, marker_expires, state["deleted_ts"])


def _range_scope(stone: RangeTombstone) -> str:
    return json.dumps(
        {
            "start": [_jsonable(v) for v in stone.start],
            "start_inclusive": stone.start_inclusive,
            "end": [_jsonable(v) for v in stone.end],
            "end_inclusive": stone.end_inclusive,
            "descending": list(stone.descending),
        },
        separators=(",", ":"),
    )


_FROM_JSON: dict[str, Any] = {
    "bytea": bytes.fromhex,
    "uuid": uuid.UUID,
    "numeric": Decimal,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "timestamptz": dt.datetime.fromisoformat,
    "inet": ipaddress.ip_address,
}


def _from_json(schema: TableSchema, column: str, value: Any) -> Any:
    """Back from json_key's rendering to the PostgreSQL value of a key column."""
    if value is None:
        return None
    parse = _FROM_JSON.get(pg_type(schema.columns[column]))
    return parse(value) if parse else value
