"""Interpret: a decoded Debezium Cassandra record becomes a ChangeEvent. Pure, no I/O.

The connector's envelope (see the README, "What the sink reads") carries `op` in i/u/d/r, the
write timestamp in `source.ts_us`, and every touched column of `after` as a cell
{value, deletion_ts, set}; an untouched column has no cell at all.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cdc_sink.errors import EventError

RANGE_FIELDS = ("_range_start", "_range_end")


class Op(enum.Enum):
    """What a Cassandra mutation did. `RANGE` is a range tombstone, not a snapshot read."""

    INSERT = "i"
    UPDATE = "u"
    DELETE = "d"
    RANGE = "r"


@dataclass(slots=True)
class Position:
    """Where a record sits in Kafka."""

    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class Cell:
    """One written column: `value` None is an explicit null; `expires_us` is a TTL's expiry."""

    value: Any
    expires_us: int | None


@dataclass(frozen=True, slots=True)
class Bound:
    """One end of a range tombstone: clustering (column, Cassandra text, marshal type) prefix."""

    values: tuple[tuple[str, str, str], ...]
    inclusive: bool


Key = tuple[Any, ...]  # primary-key values in the table's key-column order


@dataclass(slots=True)
class ChangeEvent:
    """One Cassandra mutation of one row, partition or clustering range.

    `key` holds every primary-key column of the Kafka key; for a partition delete or range
    tombstone the clustering columns are None. `cells` holds only the non-key columns the
    mutation wrote. `ts_us` is Cassandra's write timestamp (µs): last write wins by it.
    """

    keyspace: str
    table: str
    op: Op
    key: Mapping[str, Any]
    cells: Mapping[str, Cell]
    ts_us: int
    snapshot: bool
    position: Position
    range_start: Bound | None = None
    range_end: Bound | None = None

    @property
    def is_partition_delete(self) -> bool:
        return self.op is Op.DELETE and any(v is None for v in self.key.values())


@dataclass(slots=True)
class Mutation:
    """A ChangeEvent with its key and values already converted to PostgreSQL values."""

    event: ChangeEvent
    key: Key  # in the table's key-column order; partition deletes/ranges have None clustering
    values: Mapping[str, Any]  # converted cell values of `event.cells`
    range_start: tuple[Any, ...] = ()
    range_end: tuple[Any, ...] = ()
    descending: tuple[bool, ...] = ()
    # Non-frozen collections the event sent empty: deletions of their elements (values None).
    emptied: tuple[str, ...] = ()


_OPS = {op.value: op for op in Op}
_OP_NAMES = {
    Op.INSERT: "insert",
    Op.UPDATE: "update",
    Op.DELETE: "delete",
    Op.RANGE: "range_delete",
}


def op_name(event: ChangeEvent) -> str:
    """What the event did, as cdc_events_processed_total{op} names it: insert, update, delete
    (a row), partition_delete, range_delete, or snapshot (a row the connector's initial
    snapshot read, whatever its op)."""
    if event.snapshot:
        return "snapshot"
    if event.op is Op.DELETE and event.is_partition_delete:
        return "partition_delete"
    return _OP_NAMES[event.op]


_WRITES = (Op.INSERT, Op.UPDATE)
# What Cassandra accepts as a keyspace or table name (its table names may be longer than its
# keyspace names: the wider bound serves both). Anything else cannot come from Cassandra, and
# looking it up in system_schema could only fail.
CASSANDRA_NAME_MAX = 222
_CASSANDRA_NAME = re.compile(rf"[A-Za-z0-9_]{{1,{CASSANDRA_NAME_MAX}}}")


def _preview(name: str) -> str:
    return repr(name) if len(name) <= 60 else f"{name[:40]!r}… ({len(name)} characters)"


_SNAPSHOT_TRUE = frozenset({"true", "last"})


def interpret(
    key: Mapping[str, Any] | None, value: Mapping[str, Any], position: Position
) -> ChangeEvent:
    """Build the ChangeEvent of one decoded record; raise EventError if it is not one."""
    op_text = value.get("op")
    op = _OPS.get(op_text) if isinstance(op_text, str) else None
    if op is None:
        raise EventError(f"unknown op {op_text!r} (expected one of i, u, d, r)")
    source = value.get("source")
    after = value.get("after")
    # `type(...) is dict` first: decoded records are dicts, and the ABC check costs 5x more.
    if not (type(source) is dict or isinstance(source, Mapping)) or not (
        type(after) is dict or isinstance(after, Mapping)
    ):
        raise EventError("the envelope lacks its `source` or `after` struct")
    keyspace, table = source.get("keyspace"), source.get("table")
    if not isinstance(keyspace, str) or not isinstance(table, str) or not table:
        raise EventError("source.keyspace / source.table missing")
    if _CASSANDRA_NAME.fullmatch(keyspace) is None or _CASSANDRA_NAME.fullmatch(table) is None:
        raise EventError(
            f"source.keyspace / source.table {_preview(keyspace)}.{_preview(table)} is no "
            f"Cassandra name (letters, digits and _, at most {CASSANDRA_NAME_MAX} characters)"
        )
    ts_us = source.get("ts_us")
    if type(ts_us) is not int:
        if ts_us is None and source.get("ts_ms") is not None:
            ts_us = _whole(source["ts_ms"], "source.ts_ms") * 1000  # older connectors: ms only
        else:
            ts_us = _whole(ts_us, "source.ts_us (the write timestamp)")
    if key is None or not key:
        raise EventError("the record has no key: the primary key is unknown")

    cells: dict[str, Cell] = {}
    if op in _WRITES:
        for name, cell in after.items():
            if cell is None or name in key or name in RANGE_FIELDS:
                continue  # key columns come from the key; an absent cell means "untouched"
            if not (type(cell) is dict or isinstance(cell, Mapping)) or "value" not in cell:
                raise EventError(f"column {name!r} is not a Debezium cell struct")
            expires = cell.get("deletion_ts")
            if expires is not None and type(expires) is not int:
                expires = _whole(expires, f"{name}.deletion_ts")
            cells[name] = Cell(cell["value"], expires)
    elif op is Op.DELETE and all(v is None for v in key.values()):
        raise EventError("a delete whose key has no value at all")

    start = end = None
    if op is Op.RANGE:
        start, end = _bound(after.get("_range_start")), _bound(after.get("_range_end"))
    return ChangeEvent(
        keyspace=keyspace,
        table=table,
        op=op,
        key=dict(key),
        cells=cells,
        ts_us=ts_us,
        snapshot=is_snapshot(source.get("snapshot")),
        position=position,
        range_start=start,
        range_end=end,
    )


def is_snapshot(raw: Any) -> bool:
    """Whether `source.snapshot` says the connector's initial snapshot read the row."""
    if raw is None or raw == "false":  # what nearly every record carries
        return False
    return str(raw).lower() in _SNAPSHOT_TRUE


def _whole(raw: Any, field: str) -> int:
    """An instant as the connector writes it: an integer (int64), never text, bool or float."""
    if type(raw) is int:
        return raw
    if raw is None:
        raise EventError(f"{field} is missing")
    text = repr(raw)
    shown = text if len(text) <= 40 else text[:37] + "..."
    raise EventError(f"{field} is {type(raw).__name__} {shown}, not an integer")


def _bound(raw: Any) -> Bound:
    if raw is None:
        return Bound((), inclusive=True)  # unbounded side
    if not isinstance(raw, Mapping):
        raise EventError("a range bound is not a struct")
    method = str(raw.get("method", ""))
    values = raw.get("values") or []
    try:
        parsed = tuple((str(v["name"]), str(v["value"]), str(v["type"])) for v in values)
    except (KeyError, TypeError):
        raise EventError("a range bound value lacks name, value or type") from None
    if "INCL" not in method and "EXCL" not in method:
        raise EventError(f"unknown range bound kind {method!r}")
    return Bound(parsed, inclusive=method.startswith("INCL"))
