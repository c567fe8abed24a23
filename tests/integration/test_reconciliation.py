"""Reconciliation against the real Cassandra and PostgreSQL: no false positives on identical
data of every type, every seeded difference found with its kind and columns, repair to zero."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from cdc_recon.service import NOT_CONVERGED
from cdc_sink.model.events import Op
from tests.support import recon_data as data
from tests.support.names import Unique
from tests.support.recon_data import Setup, make_setup
from tests.support.stack import Endpoints

IDENTICAL_ROWS = int(os.environ.get("CDC_TEST_RECON_ROWS", "100000"))


@pytest.fixture
async def identical(stack: Endpoints, unique: Unique) -> AsyncIterator[Setup]:
    async for setup in make_setup(stack, unique, IDENTICAL_ROWS, buckets=1024):
        yield setup


@pytest.fixture
async def small(stack: Endpoints, unique: Unique) -> AsyncIterator[Setup]:
    async for setup in make_setup(stack, unique, 600, buckets=64):
        yield setup


def window(first: int, last: int) -> dict[str, str]:
    """The timestamp_range window holding the writes of rows first..last-1."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return {
        name: (epoch + dt.timedelta(microseconds=data.TS0 + row)).isoformat()
        for name, row in (("window_start", first), ("window_end", last))
    }


@pytest.mark.timeout(1800)  # 100,000 rows of every type: 5-15 minutes on a busy 2-core box
async def test_identical_rows_of_every_type_show_no_difference(identical: Setup) -> None:
    """100,000 identical rows of every supported type: every strategy reports zero."""
    rec, count = identical.reconciler, len(identical.rows)
    # The window holds a fifth of the rows (every type: the values repeat every VARIANTS rows).
    first, last = count * 2 // 5, count * 3 // 5
    began = time.monotonic()
    for strategy, options in (
        ("row_count", {}),
        ("checksum", {}),
        ("timestamp_range", window(first, last)),
        ("sample", {"sample_size": 500, "seed": 7}),
    ):
        job = await rec.run(data.TARGET, strategy, options)
        assert job["status"] == "succeeded", job["error"]
        found = await rec.repository.mismatches(job=job["id"])
        assert job["mismatches"] == 0, (strategy, _columns(found), found[:3])
        assert job["drift_percentage"] == 0.0
        if strategy == "sample":
            assert job["details"]["sampled"] >= 250
        elif strategy == "timestamp_range":
            assert job["cassandra_rows"] == job["postgres_rows"] == last - first
        else:
            assert job["cassandra_rows"] == job["postgres_rows"] == count, strategy
        print(f"{strategy}: {time.monotonic() - began:.1f} s", flush=True)
        began = time.monotonic()


def _update(setup: Setup, row: data.Row, ts: int, **values: Any) -> None:
    """Write new values in Cassandra only (a change the pipeline missed)."""
    sets = ", ".join(f"{c} = ?" for c in values)
    where = " AND ".join(f"{k} = ?" for k in data.KEY)
    statement = setup.session.prepare(
        f"UPDATE {setup.keyspace}.{data.TABLE} USING TIMESTAMP {ts} SET {sets} WHERE {where}"
    )
    setup.session.execute(statement, [*values.values(), *row.key.values()])


async def _seed_drift(setup: Setup) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Seed every kind of difference; return {key text: (kind, columns)} expected."""
    rows, ks, later = setup.rows, setup.keyspace, data.TS0 + 10_000_000
    expected: dict[str, tuple[str, tuple[str, ...]]] = {}

    def key_text(row: data.Row) -> str:
        from cdc_recon.canonical import key_text as text

        return text([row.key["id"], row.key["region"], str(row.key["seq"])])

    # Missing in PostgreSQL: rows only Cassandra has.
    extra_rows = [data.make_row(len(rows) + i) for i in range(3)]
    data.load_cassandra(setup.session, ks, extra_rows)
    for row in extra_rows:
        expected[key_text(row)] = ("missing_in_postgres", ())
    # Extra in PostgreSQL: deleted in Cassandra only.
    where = " AND ".join(f"{k} = %s" for k in data.KEY)
    for row in rows[10:13]:
        setup.session.execute(
            f"DELETE FROM {ks}.{data.TABLE} USING TIMESTAMP {later} WHERE {where}",
            list(row.key.values()),
        )
        expected[key_text(row)] = ("extra_in_postgres", ())
    # Changed in Cassandra only, one or more columns of each kind of type.
    address = data.Address("moved", 1, Decimal("0.01"), (0.0, 0.0), {"z"}, dt.datetime(2000, 1, 1))
    changes: list[dict[str, Any]] = [
        {"t_dec": Decimal("123.4560001")},
        {"t_ts": dt.datetime(1901, 5, 6, 7, 8, 9)},
        {"s_text": {"changed"}, "m_text_int": {"z": 1}},
        {"addr": address},
        {"f_addr": address, "l_addr": [address]},
        {"t_float": 1.5, "t_double": -2.5, "t_varint": 10**30},
        {"t_blob": b"\x01", "t_inet": "192.168.0.1", "t_uuid": data.uuid.UUID(int=5)},
        {"t_date": data.Date(1), "t_time": data.Time(1), "t_dur": data.Duration(0, 1, 0)},
        {"tup": (1, "x", dt.datetime(1999, 1, 1)), "f_map": {1: "one"}, "l_ts": []},
        {"f_list": [0.25], "f_set": set(), "s_dec": {Decimal("2.5")}, "m_nested": {"n": [9]}},
        {"t_text": None, "t_bool": None},
    ]
    for offset, change in enumerate(changes):
        row = rows[100 + offset]
        _update(setup, row, later, **change)
        expected[key_text(row)] = ("value_mismatch", tuple(sorted(change)))
    # Edited by hand in PostgreSQL (the stored write timestamps stay as they were).
    async with setup.pool.acquire() as conn:
        for offset, (column, sql_value) in enumerate(
            (
                ("t_int", "t_int + 1"),
                ("addr", """jsonb_set(addr, '{zip}', '0')"""),
                ("t_dec", "t_dec * 10"),
                ("l_int", "array_append(l_int, 1)"),
            )
        ):
            row = rows[200 + offset]
            await conn.execute(
                f"UPDATE {data.TARGET} SET {column} = {sql_value} WHERE id = $1 AND region = $2 "
                "AND seq = $3",
                *row.key.values(),
            )
            expected[key_text(row)] = ("value_mismatch", (column,))
        # A row PostgreSQL has but Cassandra never had.
        ghost = data.make_row(len(rows) + 100)
        table = await data.sink_schema(setup.pool, setup.schema, None, ks, ghost)
        await data.apply_events(conn, setup.schema, table, iter([data.event(ks, ghost, Op.INSERT)]))
        expected[key_text(ghost)] = ("extra_in_postgres", ())
    return expected


async def test_seeded_drift_is_found_exactly_and_repaired(small: Setup) -> None:
    """Missing, extra and changed rows (every kind of type) are reported with the right kind
    and columns by checksum; repair then brings a fresh checksum run to zero."""
    expected = await _seed_drift(small)
    rec = small.reconciler
    job = await rec.run(data.TARGET, "checksum")
    assert job["status"] == "succeeded", job["error"]
    found = {
        m["row_key"] and _text(m["row_key"]): (m["kind"], tuple(sorted(m["columns"])))
        for m in await rec.repository.mismatches(job=job["id"])
    }
    assert found == expected
    assert job["mismatches"] == len(expected)
    assert job["drift_percentage"] == pytest.approx(len(expected) / job["cassandra_rows"] * 100)

    summary = await rec.repair(job["id"])
    assert (summary.repaired, summary.unresolved, summary.skipped) == (len(expected), 0, 0)
    resolved = await rec.repository.mismatches(job=job["id"])
    assert {m["status"] for m in resolved} == {"resolved"}
    assert all(m["resolution"] for m in resolved)

    again = await rec.run(data.TARGET, "checksum")
    assert (again["status"], again["mismatches"]) == ("succeeded", 0)
    assert again["cassandra_rows"] == again["postgres_rows"]


async def test_repair_records_what_it_could_not_fix(small: Setup) -> None:
    """A Cassandra value PostgreSQL cannot hold (text with NUL) is left open as "cannot
    repair", and a row whose delete PostgreSQL holds at a newer timestamp than Cassandra's
    write (a zombie row) is left open as "did not converge"; neither counts as repaired, and
    both rows stay as they were."""
    rows, later = small.rows, data.TS0 + 10_000_000
    _update(small, rows[20], later, t_text="nul\x00inside")
    held = rows[21]
    table = await data.sink_schema(small.pool, small.schema, None, small.keyspace, held)
    newer_delete = replace(data.event(small.keyspace, held, Op.DELETE), cells={}, ts_us=later * 9)
    async with small.pool.acquire() as conn:
        await data.apply_events(conn, small.schema, table, iter([newer_delete]))
    rec = small.reconciler
    job = await rec.run(data.TARGET, "checksum")
    assert (job["status"], job["mismatches"]) == ("succeeded", 2), job["error"]

    summary = await rec.repair(job["id"])
    assert (summary.repaired, summary.unresolved, summary.skipped) == (0, 1, 1)
    outcome = {
        (m["columns"] or [m["kind"]])[0]: (m["status"], m["resolution"])
        for m in await rec.repository.mismatches(job=job["id"])
    }
    assert outcome["missing_in_postgres"] == ("open", NOT_CONVERGED)
    assert outcome["t_text"][0] == "open"
    assert outcome["t_text"][1].startswith("cannot repair:")
    assert "NUL" in outcome["t_text"][1]
    again = await rec.run(data.TARGET, "checksum")
    assert again["mismatches"] == 2


def _text(key: list[Any]) -> str:
    from cdc_recon.canonical import key_text

    return key_text(key)


def _columns(mismatches: list[dict[str, Any]]) -> dict[str, int]:
    """How many mismatches name each column (or kind), for a readable failure."""
    counts: dict[str, int] = {}
    for m in mismatches:
        for name in m["columns"] or [m["kind"]]:
            counts[name] = counts.get(name, 0) + 1
    return counts
