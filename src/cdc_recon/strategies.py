"""Strategies: how a table's two copies are compared. Decisions are pure; reads go through the
`RowSource` protocol (readers.py implements it for Cassandra and PostgreSQL).

- row_count: both counts; drift % = |cassandra - postgres| / cassandra * 100.
- checksum: every row's SHA-256 (of its canonical form) is added (mod 2^256) into one of
  `buckets` buckets chosen by a hash of its key, with a row count per bucket, on each side.
  Memory is O(buckets). Buckets that differ are drilled into: both sides are scanned again
  keeping only the rows of those buckets, and every differing key is reported.
- timestamp_range: the rows written in [start, end) by their write time (the newest WRITETIME
  of their single-cell columns in Cassandra; the same columns' timestamps the sink stores in
  `_cdc_cells`), compared by value and by per-column write timestamp.
- sample: N keys drawn at random (half from each side, so rows missing on either side can be
  drawn), each compared column by column.

Every difference is a Finding: missing_in_postgres, extra_in_postgres or value_mismatch with
the names of the columns that differ.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cdc_recon.canonical import Canon, bucket_of, differing_columns, key_text, row_digest
from cdc_recon.readers import Keep, ReconTable, Scanned

_MOD = 1 << 256


class Strategy(enum.Enum):
    ROW_COUNT = "row_count"
    CHECKSUM = "checksum"
    TIMESTAMP_RANGE = "timestamp_range"
    SAMPLE = "sample"


class Kind(enum.Enum):
    MISSING_IN_POSTGRES = "missing_in_postgres"
    EXTRA_IN_POSTGRES = "extra_in_postgres"
    VALUE_MISMATCH = "value_mismatch"


@dataclass(frozen=True)
class Finding:
    """One differing key (canonical values) and, for value_mismatch, the columns."""

    key: tuple[Canon, ...]
    kind: Kind
    columns: tuple[str, ...] = ()


@dataclass
class Outcome:
    """What a strategy found. `compared` is the number of rows the drift is relative to."""

    cassandra_rows: int | None
    postgres_rows: int | None
    findings: list[Finding] = field(default_factory=list)
    compared: int = 0
    mismatches: int | None = None  # when not len(findings) (row_count)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def mismatch_count(self) -> int:
        return len(self.findings) if self.mismatches is None else self.mismatches

    @property
    def drift_percentage(self) -> float:
        return drift(self.mismatch_count, self.compared)


def drift(differences: int, reference: int) -> float:
    """differences / reference * 100; any difference against an empty reference is 100 %."""
    if reference <= 0:
        return 0.0 if differences == 0 else 100.0
    return differences / reference * 100.0


class RowSource(Protocol):
    """One side of the comparison."""

    def scan(
        self, table: ReconTable, *, writetimes: bool = False, keep: Keep | None = None
    ) -> AsyncIterator[list[Scanned]]: ...

    async def count(self, table: ReconTable) -> int: ...

    async def fetch(
        self, table: ReconTable, keys: Sequence[tuple[Canon, ...]], *, writetimes: bool = False
    ) -> dict[str, Scanned]: ...

    async def random_keys(
        self, table: ReconTable, count: int, seed: int
    ) -> list[tuple[Canon, ...]]: ...


# --------------------------------------------------------------------------------------------
# pure comparison


def compare_rows(
    names: Sequence[str],
    cassandra: Mapping[str, Scanned],
    postgres: Mapping[str, Scanned],
    *,
    writetime_columns: Iterable[str] = (),
) -> list[Finding]:
    """Every key whose rows differ, sorted by key text. With `writetime_columns`, a column
    whose write timestamp differs counts as differing too."""
    stamped = set(writetime_columns)
    findings = []
    for text in sorted(cassandra.keys() | postgres.keys()):
        c, p = cassandra.get(text), postgres.get(text)
        if p is None:
            assert c is not None
            findings.append(Finding(c.key, Kind.MISSING_IN_POSTGRES))
            continue
        if c is None:
            findings.append(Finding(p.key, Kind.EXTRA_IN_POSTGRES))
            continue
        columns = differing_columns(names, c.values, p.values)
        if stamped and c.writetimes is not None and p.writetimes is not None:
            columns += [
                n
                for n in names
                if n in stamped and n not in columns and c.writetimes.get(n) != p.writetimes.get(n)
            ]
        if columns:
            findings.append(Finding(c.key, Kind.VALUE_MISMATCH, tuple(columns)))
    return findings


class Buckets:
    """Per-bucket row counts and digest sums (mod 2^256): order-independent, O(buckets)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.counts = [0] * size
        self.sums = [0] * size
        self.rows = 0

    def add(self, row: Scanned) -> None:
        index = bucket_of(row.key_text, self.size)
        self.counts[index] += 1
        self.sums[index] = (
            self.sums[index] + int.from_bytes(row_digest((row.key, row.values)))
        ) % _MOD
        self.rows += 1

    def differing(self, other: Buckets) -> set[int]:
        return {
            i
            for i in range(self.size)
            if self.counts[i] != other.counts[i] or self.sums[i] != other.sums[i]
        }


# --------------------------------------------------------------------------------------------
# strategies


async def row_count(table: ReconTable, cassandra: RowSource, postgres: RowSource) -> Outcome:
    c, p = await asyncio.gather(cassandra.count(table), postgres.count(table))
    return Outcome(c, p, compared=c, mismatches=abs(c - p))


async def _aggregate(source: RowSource, table: ReconTable, buckets: int) -> Buckets:
    result = Buckets(buckets)
    async for page in source.scan(table):
        for row in page:
            result.add(row)
    return result


async def _collect(
    source: RowSource, table: ReconTable, buckets: int, wanted: set[int]
) -> dict[str, Scanned]:
    kept: dict[str, Scanned] = {}
    async for page in source.scan(table):
        for row in page:
            text = row.key_text
            if bucket_of(text, buckets) in wanted:
                kept[text] = row
    return kept


async def checksum(
    table: ReconTable, cassandra: RowSource, postgres: RowSource, *, buckets: int
) -> Outcome:
    c, p = await asyncio.gather(
        _aggregate(cassandra, table, buckets), _aggregate(postgres, table, buckets)
    )
    outcome = Outcome(c.rows, p.rows, compared=c.rows)
    bad = c.differing(p)
    outcome.details = {"buckets": buckets, "differing_buckets": len(bad)}
    if bad:
        c_rows, p_rows = await asyncio.gather(
            _collect(cassandra, table, buckets, bad), _collect(postgres, table, buckets, bad)
        )
        outcome.findings = compare_rows(table.value_columns, c_rows, p_rows)
    return outcome


async def timestamp_range(
    table: ReconTable,
    cassandra: RowSource,
    postgres: RowSource,
    *,
    start_us: int,
    end_us: int,
) -> Outcome:
    stamped = table.single_cell_columns

    def written(stamps: dict[str, int]) -> int | None:
        """The newest write timestamp among the row's non-null stamped columns."""
        return max((stamps[c] for c in stamped if c in stamps), default=None)

    def wanted(stamps: dict[str, int]) -> bool:
        # In the window, or without a write time (counted): others are never canonicalised.
        at = written(stamps)
        return at is None or start_us <= at < end_us

    async def in_window(source: RowSource) -> tuple[dict[str, Scanned], int]:
        kept: dict[str, Scanned] = {}
        unstamped = 0
        async for page in source.scan(table, writetimes=True, keep=wanted):
            for row in page:  # in the window (`wanted` kept only those), or without a write time
                if written(row.writetimes or {}) is None:
                    unstamped += 1
                else:
                    kept[row.key_text] = row
        return kept, unstamped

    (c_rows, c_blind), (p_rows, p_blind) = await asyncio.gather(
        in_window(cassandra), in_window(postgres)
    )
    # A row in one window only may exist on the other side with another write time: read it.
    only_c = [c_rows[k].key for k in c_rows.keys() - p_rows.keys()]
    only_p = [p_rows[k].key for k in p_rows.keys() - c_rows.keys()]
    extra_p, extra_c = await asyncio.gather(
        postgres.fetch(table, only_c, writetimes=True),
        cassandra.fetch(table, only_p, writetimes=True),
    )
    findings = compare_rows(
        table.value_columns, {**extra_c, **c_rows}, {**extra_p, **p_rows}, writetime_columns=stamped
    )
    return Outcome(
        len(c_rows),
        len(p_rows),
        findings,
        compared=len(c_rows),
        details={
            "window_rows_cassandra": len(c_rows),
            "window_rows_postgres": len(p_rows),
            "rows_without_write_time": {"cassandra": c_blind, "postgres": p_blind},
        },
    )


async def sample(
    table: ReconTable, cassandra: RowSource, postgres: RowSource, *, size: int, seed: int
) -> Outcome:
    half = max(1, size // 2)
    c_keys, p_keys = await asyncio.gather(
        cassandra.random_keys(table, size - half, seed), postgres.random_keys(table, half, seed)
    )
    keys = list({key_text(k): k for k in (*c_keys, *p_keys)}.values())
    c_rows, p_rows = await asyncio.gather(cassandra.fetch(table, keys), postgres.fetch(table, keys))
    findings = compare_rows(table.value_columns, c_rows, p_rows)
    return Outcome(
        len(c_rows), len(p_rows), findings, compared=len(keys), details={"sampled": len(keys)}
    )
