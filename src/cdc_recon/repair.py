"""Repair: make PostgreSQL rows match Cassandra again, with the sink's own semantics.

Repairs go through the shared core the sink writes with: each fix becomes `ChangeEvent`s,
converted by `TableSchema.to_mutation` and applied by `cdc_sink.apply.writer.PgWriter` (merge with
per-cell last-write-wins, `_cdc_cells`, TTL expiry, tombstones), in batches with no
checkpoint moves. Nothing here writes a target table with its own SQL.

Timestamps (pure, `plan_repair`):
- a cell Cassandra has is written at its Cassandra WRITETIME, with its TTL;
- where PostgreSQL holds a cell at the same or a newer timestamp (a hand edit keeps the stored
  timestamp), the fix is written one microsecond after the stored one, so it wins the merge;
- a column that is null in Cassandra but not in PostgreSQL gets a null one microsecond after
  the stored cell (the smallest timestamp that supersedes it);
- a row missing in PostgreSQL is written with an INSERT at its newest timestamp (the row
  marker), a row Cassandra no longer has is deleted by a row tombstone one microsecond after
  everything stored for it.
A later real change event carries a newer timestamp and still wins, as in Cassandra.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cdc_recon.readers import NativeRow, ReconTable, RowStamps
from cdc_recon.strategies import Kind
from cdc_sink.model.events import Cell, ChangeEvent, Op, Position

REPAIR_POSITION = Position("cdc-reconciliation-repair", 0, 0)


@dataclass(frozen=True)
class RepairAction:
    """What will be done for one key: the events, and the resolution to record."""

    events: tuple[ChangeEvent, ...]
    resolution: str


def plan_repair(
    table: ReconTable,
    kind: Kind,
    key: Sequence[Any],
    columns: Iterable[str],
    cassandra: NativeRow | None,
    postgres: RowStamps | None,
    now_us: int,
) -> RepairAction:
    """The events that bring one PostgreSQL row to what Cassandra holds now. `key` holds
    the driver values of the key columns; `columns` the differing ones (value_mismatch)."""
    key_map = dict(zip(table.key_columns, key, strict=True))

    def event(op: Op, ts: int, cells: dict[str, Cell]) -> ChangeEvent:
        return ChangeEvent(
            keyspace=table.keyspace,
            table=table.source,
            op=op,
            key=key_map,
            cells=cells,
            ts_us=ts,
            snapshot=False,
            position=REPAIR_POSITION,
        )

    if cassandra is None:
        if postgres is None:
            return RepairAction((), "already consistent: absent on both sides")
        return RepairAction(
            (event(Op.DELETE, postgres.newest + 1, {}),),
            "deleted: Cassandra no longer has the row",
        )
    names = table.value_columns if kind is Kind.MISSING_IN_POSTGRES else tuple(columns)
    stored = postgres.cells if postgres is not None else {}
    by_ts: dict[int, dict[str, Cell]] = {}
    for name in names:
        value = cassandra.values.get(name)
        written = cassandra.writetimes.get(name) if value is not None else None
        floor = stored[name] + 1 if name in stored else None
        candidates = [t for t in (written, floor) if t is not None]
        if not candidates:
            if value is None:
                continue  # null on both sides as far as timestamps go: nothing to supersede
            candidates = [now_us]
        ts = max(candidates)
        ttl = cassandra.ttls.get(name) if value is not None else None
        expires = now_us + ttl * 1_000_000 if ttl else None
        by_ts.setdefault(ts, {})[name] = Cell(value, expires)
    if kind is Kind.MISSING_IN_POSTGRES or postgres is None:
        # The row marker: Cassandra shows the row, so it must be live here too.
        newest = max(by_ts, default=now_us)
        marker_cells = by_ts.pop(newest, {})
        events = [event(Op.INSERT, newest, marker_cells)]
        events += [event(Op.UPDATE, ts, cells) for ts, cells in sorted(by_ts.items())]
        return RepairAction(tuple(events), "upserted from Cassandra")
    events = [event(Op.UPDATE, ts, cells) for ts, cells in sorted(by_ts.items())]
    return RepairAction(tuple(events), f"updated from Cassandra: {', '.join(names)}")
