"""Plan: merge a batch of change events into row states with Cassandra's semantics. Pure.

Every row keeps, besides its visible values, what is needed to decide later writes exactly as
Cassandra's read path would: the write timestamp (and TTL expiry) of every cell, the row marker
an INSERT writes, and the row's own tombstone. Partition and range tombstones are kept per
partition. A cell is visible when it is newer than every tombstone covering it, not null and not
expired; a row is visible when its marker or any cell is. Whatever order, duplication or
batching the events arrive in, the result is the same.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cdc_sink.model.events import Bound, ChangeEvent, Key, Mutation, Op


@dataclass(slots=True)
class CellState:
    """A cell's last write: `value` None means null (an explicit null, delete or expiry)."""

    value: Any
    ts: int
    expires_us: int | None = None


@dataclass(slots=True)
class RowState:
    """Everything known about one primary key."""

    cells: dict[str, CellState] = field(default_factory=dict)
    marker_ts: int | None = None
    marker_expires_us: int | None = None
    deleted_ts: int | None = None


@dataclass(frozen=True, slots=True)
class RangeTombstone:
    """Deletes the clustering range [start, end] (each side inclusive or not) up to `ts`."""

    start: tuple[Any, ...]
    start_inclusive: bool
    end: tuple[Any, ...]
    end_inclusive: bool
    ts: int
    descending: tuple[bool, ...] = ()  # per clustering column: declared DESC (ReversedType)


@dataclass(slots=True)
class PartitionTombstones:
    """The partition-level and range tombstones of one partition."""

    partition_ts: int | None = None
    ranges: list[RangeTombstone] = field(default_factory=list)


@dataclass
class TableState:
    """The stored state a batch needs: rows by key and tombstones by partition key."""

    key_columns: tuple[str, ...]
    partition_columns: tuple[str, ...] | None
    rows: dict[Key, RowState] = field(default_factory=dict)
    partitions: dict[Key, PartitionTombstones] = field(default_factory=dict)
    remembered: set[Key] = field(default_factory=set)  # keys loaded from the dead-row store


@dataclass
class TablePlan:
    """The outcome for every key the batch touched, and the tombstones it added."""

    rows: dict[Key, RowState]  # final state per touched key (live or not)
    new_partition_tombstones: dict[Key, int]
    new_range_tombstones: list[tuple[Key, RangeTombstone]]


def apply_mutations(state: TableState, mutations: Iterable[Mutation]) -> TablePlan:
    """Fold mutations into `state` (in place, its partition columns learned from the first
    partition or range delete when unknown) and return what changed.

    The caller must have loaded into `state` every stored row of the partitions that the
    mutations delete wholly or by range, and the tombstones of every partition touched.
    """
    touched: dict[Key, RowState] = {}
    new_partitions: dict[Key, int] = {}
    new_ranges: list[tuple[Key, RangeTombstone]] = []
    # Stored keys by partition, built at the first partition or range delete, so that each
    # such delete finds its rows without a scan of the whole batch's. Rows written after it
    # need not be added: writing a row already touches it.
    by_partition: dict[Key, list[Key]] | None = None
    for mutation in mutations:
        event = mutation.event
        if event.op is Op.RANGE or event.is_partition_delete:
            if state.partition_columns is None:
                state.partition_columns = tuple(
                    name for name in state.key_columns if event.key.get(name) is not None
                )
            partition = tuple(v for v in mutation.key if v is not None)
            tombstones = state.partitions.setdefault(partition, PartitionTombstones())
            if event.op is Op.RANGE:
                start_len = len(event.range_start.values) if event.range_start else 0
                end_len = len(event.range_end.values) if event.range_end else 0
                tombstone = RangeTombstone(
                    start=mutation.range_start[:start_len],
                    start_inclusive=_inclusive(event.range_start),
                    end=mutation.range_end[:end_len],
                    end_inclusive=_inclusive(event.range_end),
                    ts=event.ts_us,
                    descending=mutation.descending,
                )
                if tombstone not in tombstones.ranges:
                    tombstones.ranges.append(tombstone)
                    new_ranges.append((partition, tombstone))
            elif tombstones.partition_ts is None or event.ts_us > tombstones.partition_ts:
                tombstones.partition_ts = event.ts_us
                new_partitions[partition] = event.ts_us
            if by_partition is None:
                by_partition = {}
                width = len(state.partition_columns)
                for key in state.rows:
                    by_partition.setdefault(key[:width], []).append(key)
            for key in by_partition.get(partition, ()):
                touched[key] = state.rows[key]
            continue
        row = state.rows.setdefault(mutation.key, RowState())
        touched[mutation.key] = row
        if event.op is Op.DELETE:
            if row.deleted_ts is None or event.ts_us > row.deleted_ts:
                row.deleted_ts = event.ts_us
            continue
        _write_cells(row, event, mutation.values, mutation.emptied)
    return TablePlan(touched, new_partitions, new_ranges)


def _inclusive(bound: Bound | None) -> bool:
    return True if bound is None else bound.inclusive


def _write_cells(
    row: RowState, event: ChangeEvent, values: Mapping[str, Any], emptied: tuple[str, ...]
) -> None:
    ts = event.ts_us
    marks = event.op is Op.INSERT or event.snapshot
    emptied_ts = _emptied_ts(ts, marks, values) if emptied else ts
    cells = row.cells
    for name, cell in event.cells.items():
        at = emptied_ts if name in emptied else ts
        current = cells.get(name)
        # A newer write wins outright; only a tie needs the full reconciliation.
        if current is None or at > current.ts:
            cells[name] = CellState(values.get(name), at, cell.expires_us)
        elif at == current.ts:
            incoming = CellState(values.get(name), at, cell.expires_us)
            if _wins(incoming, current):
                cells[name] = incoming
    if marks:
        expiry = _insert_expiry(event, values)
        if row.marker_ts is None or ts > row.marker_ts:
            row.marker_ts, row.marker_expires_us = ts, expiry
        elif ts == row.marker_ts and row.marker_expires_us is not None:
            # The same marker seen twice: the longer-lived copy wins, as for Cassandra's cells.
            row.marker_expires_us = None if expiry is None else max(expiry, row.marker_expires_us)


def _emptied_ts(ts: int, marks: bool, values: Mapping[str, Any]) -> int:
    """When an emptied non-frozen collection's elements were deleted (they are cells of their
    own, so the deletion is a null that newer elements outlive).

    Cassandra's INSERT and `SET c = …` (null, {} and [] too) delete them one microsecond below
    the statement's timestamp, `DELETE c` at it. Debezium's ts_us is the newest thing the
    statement wrote: its own timestamp when it wrote the row marker or a live cell, so the
    deletion lies one below; else the deletion's own. `SET c = null, x = null` looks exactly
    like `DELETE c, x` and is taken for it: one microsecond late, which only a write of c at
    that very microsecond could tell.
    """
    if marks or any(value is not None for value in values.values()):
        return ts - 1
    return ts


def _wins(incoming: CellState, current: CellState) -> bool:
    """Cassandra's reconciliation of two writes of a cell at one timestamp: a null (tombstone)
    wins, then the greater value, then the longer-lived copy, so every arrival order agrees.

    Cassandra also lets a copy that has *expired* by read time win a tie against a live one;
    that needs two writes of one cell with the same timestamp and different TTLs, which the
    merge does not keep apart (the first to expire is decided at merge time instead).
    """
    if (incoming.value is None) != (current.value is None):
        return incoming.value is None
    if incoming.value != current.value:
        return _value_rank(incoming.value) > _value_rank(current.value)
    return _expiry_rank(incoming.expires_us) > _expiry_rank(current.expires_us)


def _value_rank(value: Any) -> tuple[str, Any]:
    return (type(value).__name__, value if isinstance(value, int | str | bytes) else repr(value))


def _expiry_rank(expires_us: int | None) -> float:
    return float("inf") if expires_us is None else float(expires_us)


def _insert_expiry(event: ChangeEvent, values: Mapping[str, Any]) -> int | None:
    """The row marker's TTL: Debezium does not send it, so infer it from an INSERT's cells.

    `INSERT … USING TTL` gives every non-null cell the same expiry, and the marker expires
    with them; nulls (emptied collections too) carry none. If a non-null cell has no expiry,
    the INSERT had no TTL.
    """
    expiry: int | None = None
    seen = False
    for name, cell in event.cells.items():
        if values.get(name) is None:
            continue
        if not seen:
            expiry, seen = cell.expires_us, True
        elif cell.expires_us != expiry:
            return None  # the non-null cells disagree
    return expiry


# --------------------------------------------------------------------------------------------
# reading the state the way Cassandra's SELECT would


NO_TOMBSTONE = -(2**63)


def shadow_ts(state: TableState, key: Key) -> int:
    """The newest partition or range tombstone covering `key` (NO_TOMBSTONE if none)."""
    if state.partition_columns is None:
        return NO_TOMBSTONE
    width = len(state.partition_columns)
    tombstones = state.partitions.get(key[:width])
    if tombstones is None:
        return NO_TOMBSTONE
    newest = tombstones.partition_ts if tombstones.partition_ts is not None else NO_TOMBSTONE
    clustering = key[width:]
    for tombstone in tombstones.ranges:
        if tombstone.ts > newest and covers(tombstone, clustering):
            newest = tombstone.ts
    return newest


def covers(tombstone: RangeTombstone, clustering: Sequence[Any]) -> bool:
    """Whether a full clustering key lies inside the range, in the table's clustering order."""
    reversed_ = tombstone.descending
    if tombstone.start:
        order = _compare(clustering[: len(tombstone.start)], tombstone.start, reversed_)
        if order < 0 or (order == 0 and not tombstone.start_inclusive):
            return False
    if tombstone.end:
        order = _compare(clustering[: len(tombstone.end)], tombstone.end, reversed_)
        if order > 0 or (order == 0 and not tombstone.end_inclusive):
            return False
    return True


def _compare(left: Sequence[Any], right: Sequence[Any], reversed_: Sequence[bool]) -> int:
    for index, (a, b) in enumerate(zip(left, right, strict=True)):
        if a == b:
            continue
        less = _clustering_order(a) < _clustering_order(b)
        if index < len(reversed_) and reversed_[index]:
            less = not less
        return -1 if less else 1
    return 0


def _clustering_order(value: Any) -> Any:
    """How Cassandra orders a clustering value: timeuuids by their time, then bytes."""
    if isinstance(value, uuid.UUID) and value.version == 1:
        return (value.time, value.bytes)
    return value


def settle(state: TableState, key: Key, row: RowState, now_us: int) -> RowState:
    """Drop what can never be visible again: cells and markers covered by a tombstone, and
    expired cells (kept as nulls at their write time, which is what Cassandra turns them into).
    The row's own tombstone is kept only while no partition or range tombstone supersedes it.
    """
    outer = shadow_ts(state, key)
    deleted = row.deleted_ts if row.deleted_ts is not None and row.deleted_ts > outer else None
    shadow = max(outer, deleted if deleted is not None else NO_TOMBSTONE)
    cells: dict[str, CellState] = {}
    for name, cell in row.cells.items():
        if cell.ts <= shadow:
            continue
        if cell.expires_us is not None and cell.expires_us <= now_us:
            cell = CellState(None, cell.ts, None)
        cells[name] = cell
    marker_ts, marker_expires = row.marker_ts, row.marker_expires_us
    if marker_ts is not None and marker_ts <= shadow:
        marker_ts = marker_expires = None
    # An expired marker is kept: its timestamp still beats older replicas of the same row.
    return RowState(cells, marker_ts, marker_expires, deleted)


def marker_live(row: RowState, now_us: int) -> bool:
    return row.marker_ts is not None and (
        row.marker_expires_us is None or row.marker_expires_us > now_us
    )


def is_live(row: RowState, now_us: int) -> bool:
    """A settled row is returned by SELECT when its marker or any non-null cell is."""
    return marker_live(row, now_us) or any(c.value is not None for c in row.cells.values())


def visible_values(row: RowState, columns: Iterable[str]) -> dict[str, Any]:
    """The values SELECT shows for a settled live row (untouched columns are null)."""
    return {name: (row.cells[name].value if name in row.cells else None) for name in columns}


def write_and_expiry(row: RowState, now_us: int) -> tuple[int | None, int | None]:
    """The newest write timestamp among the live parts of a settled row, and when the next of
    them expires (for the expiry task); None where there is none."""
    cells = row.cells.values()
    written = [c.ts for c in cells if c.value is not None]
    expiries = [c.expires_us for c in cells if c.value is not None and c.expires_us]
    if marker_live(row, now_us):
        assert row.marker_ts is not None
        written.append(row.marker_ts)
        if row.marker_expires_us is not None:
            expiries.append(row.marker_expires_us)
    return (max(written) if written else None), (min(expiries) if expiries else None)


@dataclass
class Outcome:
    """Where each touched key's settled state goes."""

    live: dict[Key, RowState]  # upsert into the target table
    remembered: dict[Key, RowState]  # dead, but its tombstones still shadow older writes
    removed: list[Key]  # dead and fully covered by partition/range tombstones: forget it


def settle_plan(state: TableState, plan: TablePlan, now_us: int) -> Outcome:
    """Settle every touched row at `now_us` and sort it into live, remembered or removed."""
    outcome = Outcome({}, {}, [])
    for key, row in plan.rows.items():
        settled = settle(state, key, row, now_us)
        state.rows[key] = settled
        if is_live(settled, now_us):
            outcome.live[key] = settled
        elif settled.deleted_ts is not None or settled.marker_ts is not None or settled.cells:
            outcome.remembered[key] = settled
        else:
            outcome.removed.append(key)
            del state.rows[key]
    return outcome


class FreshRow(NamedTuple):
    """The settled state of a row one write made from nothing, as flat values."""

    values: dict[str, Any]  # visible value per written column (None: null or expired)
    stamps: list[tuple[str, int, int | None]]  # (column, write ts, expiry) per written cell
    marker_ts: int | None
    marker_expires_us: int | None
    write_ts: int | None
    next_expiry: int | None


def settle_fresh(mutation: Mutation, now_us: int) -> FreshRow | None:
    """What `apply_mutations` then `settle` give a key whose only event in the batch is this
    INSERT or UPDATE and of which nothing is stored (no row, no dead row, no partition or
    range tombstone, stored or in the batch), without building the merge's objects; None when
    that row is not live (the caller takes the general path for it).

    Both paths must stay exactly equal: the writer's differential test checks that they leave
    identical tables."""
    event = mutation.event
    ts = event.ts_us
    if ts - 1 <= NO_TOMBSTONE:  # settle would drop such cells: leave that to it
        return None
    values = mutation.values
    marks = event.op is Op.INSERT or event.snapshot
    emptied = mutation.emptied
    emptied_at = _emptied_ts(ts, marks, values) if emptied else ts
    visible: dict[str, Any] = {}
    stamps: list[tuple[str, int, int | None]] = []
    newest: int | None = None
    soonest: int | None = None
    for name, cell in event.cells.items():
        at = emptied_at if name in emptied else ts
        value = values.get(name)
        expires = cell.expires_us
        if expires is not None and expires <= now_us:
            value = expires = None  # expired: a null at its write time
        stamps.append((name, at, expires))
        if value is None:
            continue
        visible[name] = value
        if newest is None or at > newest:
            newest = at
        if expires and (soonest is None or expires < soonest):
            soonest = expires
    marker_ts = marker_expires = None
    if marks:
        marker_ts, marker_expires = ts, _insert_expiry(event, values)
        if marker_expires is None or marker_expires > now_us:  # a live marker
            newest = ts if newest is None or ts > newest else newest
            if marker_expires is not None and (soonest is None or marker_expires < soonest):
                soonest = marker_expires
        elif not visible:
            return None
    elif not visible:
        return None
    return FreshRow(visible, stamps, marker_ts, marker_expires, newest, soonest)
