"""A reference model of what Cassandra's SELECT returns, and histories to feed the sink.

The model keeps every mutation and answers a read by scanning the whole history, so it does not
depend on arrival order at all: it is the oracle the sink's incremental merge must agree with.
Histories are produced as Debezium Cassandra envelopes (JSON form), so the sink's own
interpret step is exercised too.

Besides scalars the table has a non-frozen set (one cell per element) and a frozen list (one
cell). Writing a non-frozen collection (INSERT, `SET c = …`, `= null`, `= {}`) first deletes
its older elements one microsecond below the statement's timestamp; `DELETE c` deletes them
at it. Debezium sends both as an empty collection, at the newest timestamp the statement
wrote, so histories leave out the one shape whose deletion time it hides: `SET c = null`
with nothing live beside it but null cells, which looks exactly like `DELETE c, …`.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

PARTITION = ("p1", "p2")
CLUSTERING = ("c1", "c2")
KEY = PARTITION + CLUSTERING
SCALARS = ("v1", "v2", "v3")
MULTI_CELL = ("v4",)  # set<int>: a non-frozen collection; None in a write means = null/{}
FROZEN = ("v5",)  # frozen<list<int>>: a single cell; () is a value, not null
COLUMNS = SCALARS + MULTI_CELL + FROZEN
P1, P2, C1, C2 = (0, 1), ("a", "b"), (0, 1, 2), ("x", "y")
ALL_KEYS = list(itertools.product(P1, P2, C1, C2))

Row = dict[str, Any]


@dataclass(frozen=True)
class Mutation:
    """One generated Cassandra statement, already timestamped."""

    kind: str  # insert | update | delete_columns | delete_row | delete_partition | delete_range
    ts: int
    key: tuple[Any, ...]  # full key, or the partition for partition/range deletes
    cells: dict[str, tuple[Any, int | None]] = field(default_factory=dict)  # col -> (value, exp)
    start: tuple[Any, ...] = ()  # clustering prefix bounds for delete_range
    start_inclusive: bool = True
    end: tuple[Any, ...] = ()
    end_inclusive: bool = True
    marker_expires: int | None = None  # an INSERT's TTL, which also bounds its row marker

    def covers(self, clustering: tuple[Any, ...]) -> bool:
        if self.start:
            prefix = clustering[: len(self.start)]
            if prefix < self.start or (prefix == self.start and not self.start_inclusive):
                return False
        if self.end:
            prefix = clustering[: len(self.end)]
            if prefix > self.end or (prefix == self.end and not self.end_inclusive):
                return False
        return True


class CassandraModel:
    """Answers SELECT * from the full history of mutations."""

    def __init__(self, history: list[Mutation]) -> None:
        self.history = history

    def select(
        self, now_us: int, keys: Iterable[tuple[Any, ...]] = ALL_KEYS
    ) -> dict[tuple[Any, ...], Row]:
        """The live rows among `keys` (by default every key the generated histories use)."""
        result = {}
        for key in keys:
            row = self._row(key, now_us)
            if row is not None:
                result[key] = row
        return result

    def _tombstone(self, key: tuple[Any, ...]) -> int:
        partition, clustering = key[:2], key[2:]
        stamps = [-1]
        for m in self.history:
            if (
                (m.kind == "delete_row" and m.key == key)
                or (m.kind == "delete_partition" and m.key == partition)
                or (m.kind == "delete_range" and m.key == partition and m.covers(clustering))
            ):
                stamps.append(m.ts)
        return max(stamps)

    def _row(self, key: tuple[Any, ...], now_us: int) -> Row | None:
        tombstone = self._tombstone(key)
        writes = [m for m in self.history if m.kind in _WRITES and m.key == key]
        values: Row = {}
        live = False
        for column in MULTI_CELL:
            values[column] = _elements(writes, column, tombstone)
            live = live or values[column] is not None
        for column in SCALARS + FROZEN:
            candidates = [(m.ts, m.cells[column]) for m in writes if column in m.cells]
            if not candidates:
                values[column] = None
                continue
            # newest wins; on a tie a null wins, then the greater value, then the longer TTL
            ts, (value, expires) = max(
                candidates,
                key=lambda c: (
                    c[0],
                    c[1][0] is None,
                    (type(c[1][0]).__name__, c[1][0]),
                    float("inf") if c[1][1] is None else c[1][1],
                ),
            )
            if ts <= tombstone or value is None or (expires is not None and expires <= now_us):
                values[column] = None
            else:
                values[column] = list(value) if isinstance(value, tuple) else value
                live = True
        # The row marker is one liveness record: the newest INSERT's (a TTL'd re-insert
        # replaces an immortal marker, exactly like a cell).
        markers = [m for m in writes if m.kind == "insert"]
        if markers:
            newest = max(
                markers,
                key=lambda m: (
                    m.ts,
                    float("inf") if m.marker_expires is None else m.marker_expires,
                ),
            )
            expiry = newest.marker_expires
            if newest.ts > tombstone and (expiry is None or expiry > now_us):
                live = True
        return values if live else None


def expected_rows(
    history: list[Mutation], now_us: int = 2**62
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """What SELECT returns after the history, for histories too long for `select` over every
    key: the model asked one partition at a time, about the keys written there."""
    by_partition: dict[tuple[Any, ...], list[Mutation]] = defaultdict(list)
    for m in history:
        by_partition[m.key[:2]].append(m)
    rows = {}
    for mutations in by_partition.values():
        model = CassandraModel(mutations)
        for key in {m.key for m in mutations if len(m.key) == 4}:
            row = model._row(key, now_us)
            if row is not None:
                rows[key] = row
    return rows


_WRITES = ("insert", "update", "delete_columns")


def _elements(writes: list[Mutation], column: str, tombstone: int) -> list[Any] | None:
    """The live elements of a non-frozen collection, sorted (as SELECT returns a set), or None
    when it has none. Collection writes carry no TTL (Debezium does not send theirs)."""
    deleted = tombstone
    newest: dict[Any, int] = {}
    for m in writes:
        if column not in m.cells:
            continue
        deleted = max(deleted, m.ts if m.kind == "delete_columns" else m.ts - 1)
        for element in m.cells[column][0] or ():
            newest[element] = max(newest.get(element, m.ts), m.ts)
    return sorted(e for e, ts in newest.items() if ts > deleted) or None


def debezium_ts(m: Mutation) -> int:
    """`source.ts_us` as the agent sets it: the newest timestamp in the mutation. A statement
    that only empties non-frozen collections wrote nothing but their deletions, one
    microsecond below its own timestamp."""
    if m.kind == "update" and all(c in MULTI_CELL and v is None for c, (v, _) in m.cells.items()):
        return m.ts - 1
    return m.ts


def to_envelope(m: Mutation, topic_prefix: str = "ks") -> tuple[dict[str, Any], dict[str, Any]]:
    """The (key, value) Debezium's Cassandra connector would emit for this mutation."""
    ts = debezium_ts(m)
    source = {
        "version": "3.6.1.Final",
        "connector": "cassandra",
        "name": topic_prefix,
        "ts_ms": ts // 1000,
        "snapshot": "false",
        "db": "NULL",
        "ts_us": ts,
        "cluster": "test",
        "file": "CommitLog-7-1.log",
        "pos": 1,
        "keyspace": "ks",
        "table": "model",
    }
    op = {
        "insert": "i",
        "update": "u",
        "delete_columns": "u",
        "delete_row": "d",
        "delete_partition": "d",
        "delete_range": "r",
    }[m.kind]
    if m.kind in (*_WRITES, "delete_row"):
        key = dict(zip(KEY, m.key, strict=True))
    else:
        key = {**dict(zip(PARTITION, m.key, strict=True)), "c1": None, "c2": None}
    after: dict[str, Any] = {
        name: {"value": value, "deletion_ts": None, "set": True}
        for name, value in key.items()
        if value is not None
    }
    for column in COLUMNS:
        after[column] = None
    if m.kind in _WRITES:
        for column, (value, expires) in m.cells.items():
            if isinstance(value, tuple):
                value = list(value)
            elif value is None and column in MULTI_CELL:
                value = []  # how the agent sends a non-frozen collection's deletion
            after[column] = {"value": value, "deletion_ts": expires, "set": True}
    elif m.kind in ("delete_row", "delete_partition"):
        for column in COLUMNS:
            after[column] = {"value": None, "deletion_ts": m.ts, "set": True}
    after["_range_start"] = after["_range_end"] = None
    if m.kind == "delete_range":
        after["_range_start"] = _bound(m.start, m.start_inclusive, "START")
        after["_range_end"] = _bound(m.end, m.end_inclusive, "END")
    return key, {"ts_ms": ts // 1000 + 5, "op": op, "source": source, "after": after}


def _bound(values: tuple[Any, ...], inclusive: bool, side: str) -> dict[str, Any]:
    marshal = {
        "c1": "org.apache.cassandra.db.marshal.Int32Type",
        "c2": "org.apache.cassandra.db.marshal.UTF8Type",
    }
    return {
        "method": f"{'INCL' if inclusive else 'EXCL'}_{side}_BOUND",
        "values": [
            {"name": name, "value": str(value), "type": marshal[name]}
            for name, value in zip(CLUSTERING, values, strict=False)
        ],
    }


def replica_streams(
    history: list[Mutation], choices: Iterator[int], replicas: int = 3
) -> list[Mutation]:
    """Interleave `replicas` copies of the history, each copy in its own order, as the
    connectors on each replica would deliver them; `choices` picks the next replica."""
    cursors = [0] * replicas
    out: list[Mutation] = []
    while any(c < len(history) for c in cursors):
        open_ = [r for r in range(replicas) if cursors[r] < len(history)]
        replica = open_[next(choices) % len(open_)]
        out.append(history[cursors[replica]])
        cursors[replica] += 1
    return out
