"""strategies.py and repair.py over in-memory sides: exact findings, drift, repair timestamps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from cdc_recon.canonical import Canon, key_text
from cdc_recon.readers import NativeRow, ReconTable, RowStamps, Scanned
from cdc_recon.repair import plan_repair
from cdc_recon.settings import ReconciliationConfig
from cdc_recon.strategies import (
    Buckets,
    Finding,
    Kind,
    checksum,
    compare_rows,
    drift,
    row_count,
    sample,
    timestamp_range,
)
from cdc_sink.config import ConfigError
from cdc_sink.model.cql import parse_cql_type
from cdc_sink.model.events import Op

TABLE = ReconTable(
    target="cdc_t",
    keyspace="ks",
    source="t",
    key_columns=("id",),
    partition_columns=("id",),
    columns={
        "id": parse_cql_type("int"),
        "a": parse_cql_type("text"),
        "b": parse_cql_type("int"),
        "s": parse_cql_type("set<int>"),
    },
)


class Side:
    """An in-memory side: rows by key text."""

    def __init__(self, rows: Sequence[Scanned]) -> None:
        self.rows = {r.key_text: r for r in rows}

    async def scan(
        self,
        table: ReconTable,
        *,
        writetimes: bool = False,
        keep: Callable[[dict[str, int]], bool] | None = None,
    ) -> AsyncIterator[list[Scanned]]:
        items = [r for r in self.rows.values() if keep is None or keep(r.writetimes or {})]
        for start in range(0, len(items), 7):
            yield items[start : start + 7]

    async def count(self, table: ReconTable) -> int:
        return len(self.rows)

    async def fetch(
        self, table: ReconTable, keys: Sequence[tuple[Canon, ...]], *, writetimes: bool = False
    ) -> dict[str, Scanned]:
        return {key_text(k): self.rows[key_text(k)] for k in keys if key_text(k) in self.rows}

    async def random_keys(
        self, table: ReconTable, count: int, seed: int
    ) -> list[tuple[Canon, ...]]:
        return [r.key for r in list(self.rows.values())[:count]]


def row(i: int, a: str = "x", b: int | None = 1, ts: int = 100) -> Scanned:
    return Scanned((i,), (a, b, None), {"a": ts, **({"b": ts} if b is not None else {})})


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_compare_rows_classifies_every_key() -> None:
    """Missing, extra and value mismatches (with the differing columns) are all reported."""
    c = {r.key_text: r for r in (row(1), row(2), row(3, b=2), row(4))}
    p = {r.key_text: r for r in (row(1), row(3, a="y", b=3), row(4), row(5))}
    assert compare_rows(TABLE.value_columns, c, p) == [
        Finding((2,), Kind.MISSING_IN_POSTGRES),
        Finding((3,), Kind.VALUE_MISMATCH, ("a", "b")),
        Finding((5,), Kind.EXTRA_IN_POSTGRES),
    ]


def test_compare_rows_counts_write_time_differences_when_asked() -> None:
    """With writetime columns, equal values written at another time differ by that column."""
    c, p = {"[1]": row(1, ts=100)}, {"[1]": row(1, ts=101)}
    assert compare_rows(TABLE.value_columns, c, p) == []
    assert compare_rows(TABLE.value_columns, c, p, writetime_columns=("b",)) == [
        Finding((1,), Kind.VALUE_MISMATCH, ("b",))
    ]


def test_drift() -> None:
    """Drift is differences over the reference in percent; against nothing it is 0 or 100."""
    assert drift(5, 1000) == 0.5
    assert drift(0, 0) == 0.0
    assert drift(3, 0) == 100.0


def test_buckets_ignore_order_and_see_every_change() -> None:
    """Bucket sums are independent of scan order and differ for any changed, missing or
    duplicated-looking row."""
    rows = [row(i) for i in range(50)]
    one, two = Buckets(8), Buckets(8)
    for r in rows:
        one.add(r)
    for r in reversed(rows):
        two.add(r)
    assert one.differing(two) == set()
    three = Buckets(8)
    for r in rows[:-1]:
        three.add(r)
    three.add(row(49, b=2))
    assert len(one.differing(three)) == 1


def test_checksum_finds_exactly_the_differences() -> None:
    """Checksum over many rows reports exactly the seeded differences, and drift over the
    Cassandra row count."""
    c_rows = [row(i) for i in range(500)]
    p_rows = [row(20, a="changed") if r.key == (20,) else r for r in c_rows if r.key != (7,)]
    p_rows.append(row(900))
    outcome = run(checksum(TABLE, Side(c_rows), Side(p_rows), buckets=16))
    assert outcome.findings == [  # type: ignore[attr-defined]
        Finding((20,), Kind.VALUE_MISMATCH, ("a",)),
        Finding((7,), Kind.MISSING_IN_POSTGRES),
        Finding((900,), Kind.EXTRA_IN_POSTGRES),
    ]
    assert outcome.drift_percentage == pytest.approx(3 / 500 * 100)  # type: ignore[attr-defined]
    same = run(checksum(TABLE, Side(c_rows), Side(list(c_rows)), buckets=16))
    assert same.findings == []
    assert same.details["differing_buckets"] == 0


def test_row_count_and_sample() -> None:
    """row_count drifts by |c - p| / c; sample compares the drawn keys column by column."""
    c_rows = [row(i) for i in range(10)]
    p_rows = [*c_rows[:8], row(8, b=5)]
    counted = run(row_count(TABLE, Side(c_rows), Side(p_rows)))
    assert counted.mismatch_count == 1
    assert counted.drift_percentage == 10.0
    sampled = run(sample(TABLE, Side(c_rows), Side(p_rows), size=20, seed=1))
    assert set(sampled.findings) == {  # type: ignore[attr-defined]
        Finding((8,), Kind.VALUE_MISMATCH, ("b",)),
        Finding((9,), Kind.MISSING_IN_POSTGRES),
    }


def test_timestamp_range_compares_rows_written_in_the_window() -> None:
    """Rows written in the window are compared; one moved out of the window on one side is
    read back and reported; rows outside the window are not looked at."""
    c_rows = [row(1, ts=150), row(2, ts=150), row(3, ts=50), row(4, b=9, ts=60)]
    p_rows = [row(1, ts=150), row(2, ts=90), row(3, ts=50)]
    outcome = run(timestamp_range(TABLE, Side(c_rows), Side(p_rows), start_us=100, end_us=200))
    assert outcome.findings == [Finding((2,), Kind.VALUE_MISMATCH, ("a", "b"))]  # type: ignore[attr-defined]


def test_repair_plan_timestamps() -> None:
    """Cells are written at Cassandra's WRITETIME unless PostgreSQL holds a same-or-newer
    stamp (then one µs after it); missing rows get an INSERT; extra rows a row tombstone."""
    cassandra = NativeRow({"id": 1, "a": "new", "b": None, "s": {1}}, {"a": 500, "s": 300}, {})
    stored = RowStamps({"a": 500, "b": 400}, newest=500)
    action = plan_repair(TABLE, Kind.VALUE_MISMATCH, (1,), ("a", "b"), cassandra, stored, 10**6)
    assert [(e.op, e.ts_us, dict(e.cells)) for e in action.events] == [
        (Op.UPDATE, 401, {"b": action.events[0].cells["b"]}),
        (Op.UPDATE, 501, {"a": action.events[1].cells["a"]}),
    ]
    assert action.events[0].cells["b"].value is None
    assert action.events[1].cells["a"].value == "new"

    missing = plan_repair(TABLE, Kind.MISSING_IN_POSTGRES, (1,), (), cassandra, None, 10**6)
    assert [(e.op, e.ts_us, sorted(e.cells)) for e in missing.events] == [
        (Op.INSERT, 500, ["a"]),
        (Op.UPDATE, 300, ["s"]),
    ]
    extra = plan_repair(TABLE, Kind.EXTRA_IN_POSTGRES, (1,), (), None, stored, 10**6)
    assert [(e.op, e.ts_us) for e in extra.events] == [(Op.DELETE, 501)]
    gone = plan_repair(TABLE, Kind.EXTRA_IN_POSTGRES, (1,), (), None, None, 10**6)
    assert gone.events == ()
    assert "already consistent" in gone.resolution


def test_schedule_setting() -> None:
    """CDC_RECONCILIATION__SCHEDULE parses per table and strategy; bad entries name the setting."""
    config = ReconciliationConfig(
        schedule="users:checksum@60, orders:row_count", interval_seconds=9
    )
    assert config.schedule_entries() == [("users", "checksum", 60), ("orders", "row_count", 9)]
    for bad in ("users", "users:nope", "users:sample@x", "users:sample@0"):
        with pytest.raises(ConfigError, match="CDC_RECONCILIATION__SCHEDULE"):
            ReconciliationConfig(schedule=bad).validate()
    with pytest.raises(ConfigError, match="CONSISTENCY"):
        ReconciliationConfig(consistency="MOST").validate()
