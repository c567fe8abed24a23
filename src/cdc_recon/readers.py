"""Readers: the same table read from Cassandra and from PostgreSQL, as canonical rows.

CassandraReader scans by token ranges (the ring split into `splits` equal ranges, at most
`concurrency` read at once, `page_size` rows a page, at the configured consistency level) in
worker threads, because cassandra-driver is blocking; pages reach the event loop through a
bounded queue, so a slow consumer slows the scan instead of filling memory. PgReader scans by
keyset (`WHERE (key) > (last key) ORDER BY key LIMIT page_size`), which keeps every page an
index range scan however large the table. Both yield `Scanned` rows in canonical form
(canonical.py), in no particular order.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import itertools
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg

from cdc_recon.canonical import (
    Canon,
    driver_exact,
    for_cassandra,
    for_converted,
    for_postgres,
    key_text,
)
from cdc_recon.errors import ReconError
from cdc_recon.pacing import Pacer
from cdc_sink.apply.writer import keys_in
from cdc_sink.config import CassandraConfig
from cdc_sink.model.cql import CqlType, pg_type
from cdc_sink.model.masking import ColumnMask
from cdc_sink.schema import cassandra
from cdc_sink.schema.tables import TableSchema, qualified, quote_ident

MIN_TOKEN, MAX_TOKEN = -(2**63), 2**63 - 1
Keep = Callable[[dict[str, int]], bool]  # given a row's cell write times: scan it further?
_Row = TypeVar("_Row")


@dataclass(frozen=True)
class ReconTable:
    """One reconciled table: where it lives on both sides and the columns compared.

    `columns` holds Cassandra's own types (UDT fields included), key columns first (partition,
    then clustering); only columns present on both sides are compared, the others are listed
    in `cassandra_only`.
    """

    target: str
    keyspace: str
    source: str
    key_columns: tuple[str, ...]
    partition_columns: tuple[str, ...]
    columns: dict[str, CqlType]
    cassandra_only: tuple[str, ...] = ()
    # PII masks (the sink's rules): Cassandra's values are masked before they are compared
    # or repaired, as the sink masks what it writes.
    masks: Mapping[str, ColumnMask] = field(default_factory=dict, hash=False, compare=False)
    # Unmasked columns PostgreSQL holds as text since a `hash` rule was removed (the sink
    # writes their canonical text there: catalog.rendered_columns).
    rendered: frozenset[str] = field(default=frozenset(), hash=False, compare=False)

    @property
    def value_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c not in self.key_columns)

    @property
    def single_cell_columns(self) -> tuple[str, ...]:
        """Value columns stored as one cell (scalars, frozen types): their WRITETIME is the
        time of the last write, which the sink also stores. A non-frozen collection or UDT
        holds a cell per element, so removing elements leaves no WRITETIME behind."""
        return tuple(
            c
            for c in self.value_columns
            if self.columns[c].name not in ("list", "set", "map", "udt") or self.columns[c].frozen
        )

    def key_types(self) -> list[CqlType]:
        return [self.columns[c] for c in self.key_columns]

    def key_canon(
        self, side: Callable[[CqlType], Callable[[Any], Canon]]
    ) -> Callable[[Sequence[Any]], tuple[Canon, ...]]:
        """A row's leading key fields → canonical key, with one side's converters (for_cassandra
        or for_postgres) resolved once."""
        converters = [side(t) for t in self.key_types()]
        return lambda row: tuple(f(row[i]) for i, f in enumerate(converters))

    def sink_schema(self) -> TableSchema:
        """The sink's view of the table (for writing repairs through PgWriter)."""
        return TableSchema(
            keyspace=self.keyspace,
            table=self.source,
            target=self.target,
            key_columns=self.key_columns,
            columns=self.columns,
            partition_columns=self.partition_columns,
            masks=self.masks,
            rendered=self.rendered,
        )

    def cassandra_canons(self) -> list[Callable[[Any], Canon]]:
        """Per column, a cassandra-driver value → its canonical form as the sink stores it
        (masked where a rule says so, as text where the column is text)."""
        sink = self.sink_schema()
        return [
            for_cassandra(t)
            if c not in self.masks and c not in self.rendered
            else for_converted(t, sink.converters[c], sink.stored_types[c])
            for c, t in self.columns.items()
        ]

    def postgres_canons(self) -> list[Callable[[Any], Canon]]:
        """Per column, an asyncpg value → its canonical form (by the type PostgreSQL holds)."""
        return [for_postgres(t) for t in self.sink_schema().stored_types.values()]


@dataclass(slots=True)
class Scanned:
    """One row in canonical form; `writetimes` (µs, per non-null column) when asked for."""

    key: tuple[Canon, ...]
    values: tuple[Canon, ...]
    writetimes: dict[str, int] | None = None

    @property
    def key_text(self) -> str:
        return key_text(self.key)


@dataclass(frozen=True, slots=True)
class NativeRow:
    """A Cassandra row as the driver returns it: every column's value, and each non-null
    cell's WRITETIME (µs) and remaining TTL (s)."""

    values: dict[str, Any]
    writetimes: dict[str, int]
    ttls: dict[str, int]


@dataclass(frozen=True, slots=True)
class RowStamps:
    """What the sink stored about a PostgreSQL row's timestamps: each cell's, and the
    newest of the cells, the row marker and the row tombstone."""

    cells: dict[str, int]
    newest: int


# --------------------------------------------------------------------------------------------
# keys: canonical -> driver/asyncpg values (for point reads)


def native_key_value(t: CqlType, canon: Canon) -> Any:
    """The Python value both drivers accept for a canonical key value of type `t`."""
    if canon is None:
        return None
    name = t.name
    if name in ("decimal", "varint"):
        return Decimal(canon) if name == "decimal" else int(Decimal(canon))
    if name in ("float", "double"):
        return float(canon.replace("Infinity", "inf"))
    if name == "blob":
        return bytes.fromhex(canon)
    if name in ("uuid", "timeuuid"):
        return uuid.UUID(canon)
    if name == "inet":
        return ipaddress.ip_address(canon)
    if name == "timestamp":
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=canon)
    if name == "date":
        return dt.date.fromisoformat(canon)
    if name == "time":
        return dt.time.fromisoformat(canon)
    if name == "duration":
        return dt.timedelta(microseconds=canon)
    if pg_type(t) == "jsonb" or pg_type(t).endswith("[]"):
        raise ReconError(f"point reads by a {t} key are not supported")
    return canon


def native_key(table: ReconTable, key: Sequence[Canon]) -> tuple[Any, ...]:
    return tuple(native_key_value(t, v) for t, v in zip(table.key_types(), key, strict=True))


def written_key(table: ReconTable, key: Sequence[Canon]) -> tuple[Any, ...]:
    """The key as the sink's converters hold it, which the writer's json_key renders as it
    rendered the key when it was erased: `native_key`, but a varint is a Decimal. (A decimal
    keeps only its canonical scale, 12.340 is 12.34, as suppression hashes keys by value.)"""
    return tuple(
        Decimal(native) if t.name == "varint" and native is not None else native
        for t, native in zip(table.key_types(), native_key(table, key), strict=True)
    )


# --------------------------------------------------------------------------------------------
# Cassandra


def connect_cassandra(cfg: CassandraConfig, consistency: str, timeout_s: float = 60.0) -> Any:
    """A cassandra-driver session reading at `consistency`, rows as plain tuples (blocking;
    call in a thread)."""
    if not cfg.contact_points:
        raise ReconError("reconciliation needs Cassandra: set CDC_CASSANDRA__CONTACT_POINTS")
    try:
        return cassandra.connect(
            cfg, consistency=consistency, timeout_s=timeout_s, plain_tuples=True
        )
    except Exception as exc:
        raise ReconError(f"cannot connect to Cassandra: {exc}") from exc


def _cql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _cql_table(table: ReconTable) -> str:
    return f"{_cql_ident(table.keyspace)}.{_cql_ident(table.source)}"


def _newest(names: Sequence[str], stamps: Sequence[Any]) -> dict[str, int]:
    """Per column, the WRITETIME or TTL Cassandra returned for it (for a multi-cell column a
    list, one per element: the newest), leaving out the columns without one."""
    found = {}
    for name, stamp in zip(names, stamps, strict=True):
        if isinstance(stamp, list):
            stamp = max((s for s in stamp if s is not None), default=None)
        if stamp is not None:
            found[name] = int(stamp)
    return found


def token_ranges(splits: int) -> list[tuple[int, int]]:
    """The Murmur3 ring (MIN_TOKEN, MAX_TOKEN] cut into `splits` contiguous ranges."""
    width = (MAX_TOKEN - MIN_TOKEN) // splits
    bounds = [MIN_TOKEN + i * width for i in range(splits)] + [MAX_TOKEN]
    return list(itertools.pairwise(bounds))


class CassandraReader:
    """Reads a ReconTable from Cassandra. `session` is a cassandra-driver Session; `pacer`
    paces every read by the rows it read (default: unpaced)."""

    def __init__(
        self,
        session: Any,
        *,
        page_size: int = 5000,
        concurrency: int = 4,
        pacer: Pacer | None = None,
    ) -> None:
        self.session = session
        self.page_size = page_size
        self.concurrency = concurrency
        self.pacer = pacer or Pacer(0)
        self.splits = max(16, concurrency * 8)
        self._prepared: dict[str, Any] = {}

    async def _prepare(self, query: str) -> Any:
        """The prepared statement of `query`, prepared once per reader (each job would
        otherwise pay a round trip and the driver's metadata parsing for every statement)."""
        statement = self._prepared.get(query)
        if statement is None:
            statement = await asyncio.to_thread(self.session.prepare, query)
            self._prepared[query] = statement
        return statement

    def _select(self, table: ReconTable, writetimes: bool, ttls: bool = False) -> str:
        cols = [_cql_ident(c) for c in table.columns]
        if writetimes:
            cols += [f"WRITETIME({_cql_ident(c)})" for c in table.value_columns]
        if ttls:
            # TTL of a multi-cell column is a list with nulls the driver cannot decode: their
            # elements' TTLs are not read (such repairs are written without expiry).
            cols += [f"TTL({_cql_ident(c)})" for c in table.single_cell_columns]
        return f"SELECT {', '.join(cols)} FROM {_cql_table(table)}"

    def _token(self, table: ReconTable) -> str:
        return f"token({', '.join(_cql_ident(c) for c in table.partition_columns)})"

    def _convert(
        self, table: ReconTable, writetimes: bool, keep: Keep | None = None
    ) -> Callable[[Sequence[Any]], Scanned | None]:
        canons = table.cassandra_canons()
        width = len(table.key_columns)
        names = table.value_columns

        def convert(row: Sequence[Any]) -> Scanned | None:
            stamps = None
            if writetimes:
                stamps = _newest(names, row[len(canons) :])
                if keep is not None and not keep(stamps):
                    return None
            canon = [f(v) for f, v in zip(canons, row, strict=False)]
            return Scanned(tuple(canon[:width]), tuple(canon[width:]), stamps)

        return convert

    async def scan(
        self, table: ReconTable, *, writetimes: bool = False, keep: Keep | None = None
    ) -> AsyncIterator[list[Scanned]]:
        """Every row, a page at a time; `writetimes` adds each non-null cell's WRITETIME, and
        `keep` (given those) drops rows before their values are canonicalised."""
        statement = await self._prepare(
            f"{self._select(table, writetimes)} WHERE {self._token(table)} > ? "
            f"AND {self._token(table)} <= ?",
        )
        statement.fetch_size = self.page_size
        convert = self._convert(table, writetimes, keep)
        async for page in self._fan_out(
            lambda lo, hi, put: self._scan_range(statement, lo, hi, convert, put)
        ):
            yield page

    async def _fan_out(
        self, work: Callable[[int, int, Callable[[Any], None]], None]
    ) -> AsyncIterator[Any]:
        """Run `work(lo, hi, put)` for every token range in threads, `concurrency` at a time,
        and yield what they put, as it comes. Stops the threads if the consumer stops."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.concurrency * 2)
        stop = threading.Event()
        limit = asyncio.Semaphore(self.concurrency)
        done = object()

        def put(item: Any) -> None:
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            while not stop.is_set():
                try:
                    future.result(timeout=0.5)
                    return
                except TimeoutError:
                    continue
            future.cancel()
            raise asyncio.CancelledError

        async def one(lo: int, hi: int) -> None:
            async with limit:
                if not stop.is_set():
                    await asyncio.to_thread(work, lo, hi, put)

        async def produce() -> None:
            try:
                await asyncio.gather(*(one(lo, hi) for lo, hi in token_ranges(self.splits)))
                await queue.put(done)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                stop.set()
                await queue.put(exc)

        producer = asyncio.create_task(produce())
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise ReconError(f"Cassandra scan failed: {item}") from item
                yield item
        finally:
            stop.set()
            while not queue.empty():
                queue.get_nowait()
            producer.cancel()
            with contextlib.suppress(BaseException):  # the scan is over either way
                await producer

    def _scan_range(
        self,
        statement: Any,
        lo: int,
        hi: int,
        convert: Callable[[Sequence[Any]], Scanned | None],
        put: Callable[[Any], None],
    ) -> None:
        result = self.session.execute(statement, (lo, hi))
        while True:
            rows = result.current_rows
            if rows:
                put([s for s in map(convert, rows) if s is not None])
            self.pacer.pace(len(rows))
            if not result.has_more_pages:
                return
            result.fetch_next_page()

    async def count(self, table: ReconTable) -> int:
        """The number of rows, counted per token range."""
        statement = await self._prepare(
            f"SELECT count(*) FROM {_cql_table(table)} "
            f"WHERE {self._token(table)} > ? AND {self._token(table)} <= ?",
        )

        def count_range(lo: int, hi: int, put: Callable[[Any], None]) -> None:
            counted = int(self.session.execute(statement, (lo, hi)).one()[0])
            put(counted)
            self.pacer.pace(counted)  # Cassandra read every row it counted

        total = 0
        async for n in self._fan_out(count_range):
            total += n
        return total

    async def fetch(
        self, table: ReconTable, keys: Sequence[tuple[Canon, ...]], *, writetimes: bool = False
    ) -> dict[str, Scanned]:
        """The rows with these canonical keys that exist, by key text."""
        rows = await self._read_keys(
            table, keys, self._select(table, writetimes), self._convert(table, writetimes)
        )
        return {row.key_text: row for row in rows if row is not None}

    async def fetch_native(
        self, table: ReconTable, keys: Sequence[tuple[Canon, ...]]
    ) -> dict[str, NativeRow]:
        """The rows with these canonical keys as the driver returns them, with each non-null
        cell's WRITETIME and TTL (for repair), by key text."""
        names, single = table.value_columns, table.single_cell_columns
        canon_key = table.key_canon(for_cassandra)
        width, count = len(table.columns), len(names)

        def native(row: Sequence[Any]) -> tuple[str, NativeRow]:
            values = {
                name: driver_exact(t, v)
                for (name, t), v in zip(table.columns.items(), row[:width], strict=True)
            }
            stamps = _newest(names, row[width : width + count])
            ttls = _newest(single, row[width + count :])
            return key_text(canon_key(row)), NativeRow(values, stamps, ttls)

        select = self._select(table, writetimes=True, ttls=True)
        return dict(await self._read_keys(table, keys, select, native))

    async def _read_keys(
        self,
        table: ReconTable,
        keys: Sequence[tuple[Canon, ...]],
        select: str,
        convert: Callable[[Sequence[Any]], _Row],
    ) -> list[_Row]:
        """`select` (SELECT … FROM the table) of each of these canonical keys, every row found
        passed through `convert` (in the reading thread)."""
        if not keys:
            return []
        where = " AND ".join(f"{_cql_ident(c)} = ?" for c in table.key_columns)
        statement = await self._prepare(f"{select} WHERE {where}")
        params = [native_key(table, k) for k in keys]

        def run() -> list[_Row]:
            rows = self._rows_of(statement, params, max(8, self.concurrency * 4))
            return list(map(convert, rows))

        return await asyncio.to_thread(run)

    def _rows_of(
        self, statement: Any, params: Sequence[Sequence[Any]], concurrency: int
    ) -> Iterator[Any]:
        """The rows `statement` returns for each of `params`, read `concurrency` at a time
        (blocking: call in a thread); ReconError if a read fails."""
        from cassandra.concurrent import execute_concurrent_with_args

        for ok, result in execute_concurrent_with_args(
            self.session, statement, params, concurrency=concurrency
        ):
            if not ok:
                raise ReconError(f"Cassandra read failed: {result}")
            rows = list(result)
            yield from rows
            self.pacer.pace(len(rows))

    async def random_keys(
        self, table: ReconTable, count: int, seed: int
    ) -> list[tuple[Canon, ...]]:
        """Up to `count` keys at random tokens (the first row at or after each token)."""
        import random

        rng = random.Random(seed)  # noqa: S311 - sampling, not security
        keys = ", ".join(_cql_ident(c) for c in table.key_columns)
        statement = await self._prepare(
            f"SELECT {keys} FROM {_cql_table(table)} WHERE {self._token(table)} >= ? LIMIT 1",
        )
        tokens = [rng.randint(MIN_TOKEN + 1, MAX_TOKEN) for _ in range(count)]
        canon_key = table.key_canon(for_cassandra)

        def run() -> list[tuple[Canon, ...]]:
            return [canon_key(row) for row in self._rows_of(statement, [(t,) for t in tokens], 16)]

        return list(dict.fromkeys(await asyncio.to_thread(run)))


# --------------------------------------------------------------------------------------------
# PostgreSQL


class PgReader:
    """Reads a ReconTable's target from PostgreSQL (connections set up with the sink's
    `prepare_connection`, so dates and timestamps at the ends of their range read exactly)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        *,
        page_size: int = 5000,
        pacer: Pacer | None = None,
    ) -> None:
        self.pool = pool
        self.schema = schema
        self.page_size = page_size
        self.pacer = pacer or Pacer(0)

    def _select(self, table: ReconTable) -> str:
        cols = [quote_ident(c) for c in table.columns] + ["_cdc_cells::text"]
        return f"SELECT {', '.join(cols)} FROM {qualified(self.schema, table.target)}"

    def _convert(
        self, table: ReconTable, writetimes: bool, keep: Keep | None = None
    ) -> Callable[[Sequence[Any]], Scanned | None]:
        canons = table.postgres_canons()
        width = len(canons)
        keys = len(table.key_columns)
        names = table.value_columns

        def convert(row: Sequence[Any]) -> Scanned | None:
            stamps = None
            if writetimes:
                # A cell's timestamp counts while its value is not null, as WRITETIME does.
                cells = json.loads(row[width] or "{}")
                stamps = {
                    n: int(cells[n][0])
                    for n, v in zip(names, row[keys:width], strict=True)
                    if v is not None and n in cells
                }
                if keep is not None and not keep(stamps):
                    return None
            canon = [f(row[i]) for i, f in enumerate(canons)]
            return Scanned(tuple(canon[:keys]), tuple(canon[keys:]), stamps)

        return convert

    async def scan(
        self, table: ReconTable, *, writetimes: bool = False, keep: Keep | None = None
    ) -> AsyncIterator[list[Scanned]]:
        """Every row in key order, a page at a time (keyset pagination); `writetimes` and
        `keep` as for CassandraReader.scan."""
        keys = ", ".join(quote_ident(c) for c in table.key_columns)
        params = ", ".join(
            f"${i + 1}::{pg_type(table.columns[c])}" for i, c in enumerate(table.key_columns)
        )
        first = f"{self._select(table)} ORDER BY {keys} LIMIT {int(self.page_size)}"
        rest = (
            f"{self._select(table)} WHERE ({keys}) > ({params}) ORDER BY {keys} "
            f"LIMIT {int(self.page_size)}"
        )
        convert = self._convert(table, writetimes, keep)
        width = len(table.key_columns)
        last: tuple[Any, ...] | None = None
        async with self.pool.acquire() as conn:
            while True:
                rows = await (conn.fetch(first) if last is None else conn.fetch(rest, *last))
                if not rows:
                    return
                last = tuple(rows[-1][:width])
                yield [s for s in map(convert, rows) if s is not None]
                await self.pacer.pace_async(len(rows))
                if len(rows) < self.page_size:
                    return

    async def count(self, table: ReconTable) -> int:
        counted = int(
            await self.pool.fetchval(f"SELECT count(*) FROM {qualified(self.schema, table.target)}")
        )
        await self.pacer.pace_async(counted)  # PostgreSQL read every row it counted
        return counted

    async def fetch(
        self, table: ReconTable, keys: Sequence[tuple[Canon, ...]], *, writetimes: bool = False
    ) -> dict[str, Scanned]:
        """The rows with these canonical keys that exist, by key text."""
        rows = await self._read_keys(table, keys, self._select(table))
        convert = self._convert(table, writetimes)
        return {row.key_text: row for row in map(convert, rows) if row is not None}

    async def fetch_stamps(
        self, table: ReconTable, keys: Sequence[tuple[Canon, ...]]
    ) -> dict[str, RowStamps]:
        """The stored timestamps of the rows with these keys that exist, by key text."""
        idents = ", ".join(quote_ident(c) for c in table.key_columns)
        select = (
            f"SELECT {idents}, _cdc_cells::text AS cells, _cdc_marker_ts, _cdc_deleted_ts "
            f"FROM {qualified(self.schema, table.target)}"
        )
        rows = await self._read_keys(table, keys, select)
        canon_key = table.key_canon(for_postgres)
        found = {}
        for row in rows:
            cells = {n: int(v[0]) for n, v in json.loads(row["cells"] or "{}").items()}
            stamps = [*cells.values(), row["_cdc_marker_ts"] or 0, row["_cdc_deleted_ts"] or 0]
            found[key_text(canon_key(row))] = RowStamps(cells, max(stamps))
        return found

    async def _read_keys(
        self, table: ReconTable, keys: Sequence[tuple[Canon, ...]], select: str
    ) -> list[asyncpg.Record]:
        """`select` (SELECT … FROM the table) of each of these canonical keys that exists."""
        if not keys:
            return []
        natives = [native_key(table, k) for k in keys]
        where, columns = keys_in(table.columns, table.key_columns, natives)
        rows: list[asyncpg.Record] = await self.pool.fetch(f"{select} WHERE {where}", *columns)
        await self.pacer.pace_async(len(rows))
        return rows

    async def random_keys(
        self, table: ReconTable, count: int, seed: int
    ) -> list[tuple[Canon, ...]]:
        """Up to `count` keys picked at random (repeatable for one seed and table content)."""
        keys = ", ".join(quote_ident(c) for c in table.key_columns)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT setseed($1)", (seed % 1000) / 1000)
            rows = await conn.fetch(
                f"SELECT {keys} FROM {qualified(self.schema, table.target)} "
                f"ORDER BY random() LIMIT {int(count)}"
            )
        await self.pacer.pace_async(len(rows))
        canon_key = table.key_canon(for_postgres)
        return [canon_key(r) for r in rows]
