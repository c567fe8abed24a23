"""The planner agrees with a reference model of Cassandra, whatever the delivery order."""

from __future__ import annotations

import itertools
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_sink.apply.plan import (
    TableState,
    apply_mutations,
    is_live,
    settle,
    settle_plan,
    visible_values,
)
from cdc_sink.model.cql import parse_cql_type
from cdc_sink.model.events import Position, interpret
from cdc_sink.schema.tables import TableSchema
from tests.support.cassandra_model import (
    C1,
    C2,
    COLUMNS,
    KEY,
    MULTI_CELL,
    P1,
    P2,
    CassandraModel,
    Mutation,
    replica_streams,
    to_envelope,
)

SCHEMA = TableSchema(
    keyspace="ks",
    table="model",
    target="cdc_model",
    key_columns=KEY,
    columns={
        name: parse_cql_type(cql)
        for name, cql in [
            ("p1", "int"),
            ("p2", "text"),
            ("c1", "int"),
            ("c2", "text"),
            ("v1", "int"),
            ("v2", "text"),
            ("v3", "int"),
            ("v4", "set<int>"),
            ("v5", "frozen<list<int>>"),
        ]
    },
)
BASE_TS = 1_700_000_000_000_000
STEP = 1_000
NOW = BASE_TS + 60 * STEP  # TTLs on either side of "now"

values = {
    "v1": st.integers(-5, 5),
    "v2": st.sampled_from(["", "x", "ü🙂"]),
    "v3": st.integers(-(2**31), 2**31 - 1),
}


def collection_at(column: str, ts: int) -> tuple[int, ...]:
    """A collection's value as a function of the timestamp: two writes sharing one write the
    same elements. (Different whole values at one timestamp merge element by element in
    Cassandra, which the sink's value-per-write does not follow: README, "Collections".)"""
    n = ts // STEP
    if column in MULTI_CELL:
        return tuple(sorted({n % 5, n % 3 + 10}))
    return tuple(range(n % 3))  # () too: an empty frozen list is a value


@st.composite
def mutation(draw: st.DrawFn, ts: int, keys: list[tuple[Any, ...]]) -> Mutation:
    kind = draw(
        st.sampled_from(
            ["insert"] * 4
            + ["update"] * 4
            + ["delete_columns", "delete_row", "delete_partition", "delete_range"]
        )
    )
    key = draw(st.sampled_from(keys))
    partition = key[:2]
    if kind == "delete_partition":
        return Mutation(kind, ts, partition)
    if kind == "delete_range":
        c1_start, c1_end = sorted([draw(st.sampled_from(C1)), draw(st.sampled_from(C1))])
        start: tuple[Any, ...] = draw(st.sampled_from([(), (c1_start,)]))
        end: tuple[Any, ...] = draw(
            st.sampled_from([(), (c1_end,), (c1_end, draw(st.sampled_from(C2)))])
        )
        return Mutation(
            kind, ts, partition, {}, start, draw(st.booleans()), end, draw(st.booleans())
        )
    if kind == "delete_row":
        return Mutation(kind, ts, key)
    columns = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=3, unique=True))
    if kind == "delete_columns":
        return Mutation(kind, ts, key, {column: (None, None) for column in columns})
    # The TTL is a function of the timestamp, so two writes sharing a timestamp share it too
    # (see plan._wins on same-timestamp writes with different TTLs).
    ttl = (ts // STEP * 7919) % 150
    expires = ts + ttl * STEP if ttl >= 30 else None
    cells: dict[str, tuple[Any, int | None]] = {}
    for column in columns:
        if column in MULTI_CELL and expires is not None:
            value = None  # Debezium sends no TTL for a non-frozen collection's elements
        elif column in values:
            value = draw(st.one_of(st.none(), values[column]))
        else:
            value = draw(st.sampled_from([None, collection_at(column, ts)]))
        cells[column] = (value, expires if value is not None else None)
    if kind == "insert" and all(value is None for value, _ in cells.values()):
        # Debezium cannot tell an all-null INSERT's TTL; Cassandra's own clients rarely send one.
        cells["v1"] = (draw(values["v1"]), expires)
    emptied = any(c in MULTI_CELL and v is None for c, (v, _) in cells.items())
    if kind == "update" and emptied and all(v is None for v, _ in cells.values()):
        # Without a live cell beside it, `SET v4 = null, v1 = null` is `DELETE v4, v1` to the
        # agent (see tests/support/cassandra_model.py): keep the collections alone.
        cells = {c: cell for c, cell in cells.items() if c in MULTI_CELL}
    return Mutation(kind, ts, key, cells, marker_expires=expires if kind == "insert" else None)


@st.composite
def histories(draw: st.DrawFn) -> list[Mutation]:
    count = draw(st.integers(1, 40))
    # A few rows per history, so that writes, deletes and ties on one cell meet often.
    all_keys = list(itertools.product(P1, P2, C1, C2))
    keys = draw(st.lists(st.sampled_from(all_keys), min_size=1, max_size=4, unique=True))
    # Timestamps are mostly distinct, but statements of one batch (or clients with coarse
    # clocks) share one: draw each from a range narrower than the history.
    return [
        draw(mutation(BASE_TS + draw(st.integers(0, count)) * STEP, keys)) for _ in range(count)
    ]


def run_sink(deliveries: list[Mutation], batch_sizes: list[int]) -> dict[tuple[Any, ...], dict]:
    """Feed envelopes through interpret + plan in batches, keeping state like the writer."""
    state = TableState(key_columns=KEY, partition_columns=None)
    offset = 0
    position = 0
    sizes = iter(batch_sizes)
    while offset < len(deliveries):
        size = next(sizes, 7)
        batch = deliveries[offset : offset + size]
        offset += size
        mutations = []
        for m in batch:
            key, value = to_envelope(m)
            event = interpret(key, value, Position("t", 0, position))
            position += 1
            mutations.append(SCHEMA.to_mutation(event))
        plan = apply_mutations(state, mutations)
        settle_plan(state, plan, NOW)
    visible = {}
    for key, row in state.rows.items():
        settled = settle(state, key, row, NOW)
        if is_live(settled, NOW):
            visible[key] = visible_values(settled, COLUMNS)
    return visible


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=histories(),
    seed=st.integers(0, 2**32),
    batch_sizes=st.lists(st.integers(1, 25), max_size=30),
)
def test_planner_converges_to_cassandra(
    history: list[Mutation], seed: int, batch_sizes: list[int]
) -> None:
    """Three interleaved replica copies plus duplicates, in any batching, give SELECT's rows."""
    rng = random.Random(seed)
    deliveries = replica_streams(history, iter(lambda: rng.randrange(1 << 30), None))
    for _ in range(rng.randrange(0, 6)):  # replays after crashes: re-deliver a random stretch
        start = rng.randrange(len(deliveries))
        deliveries[start:start] = deliveries[start : start + rng.randrange(1, 6)]
    expected = CassandraModel(history).select(NOW)
    assert run_sink(deliveries, batch_sizes) == expected


# --------------------------------------------------------------------------------------------
# non-frozen collections set to null, {} or [] (Debezium: an empty collection)

ROW = (0, "a", 0, "x")
TS = BASE_TS + 10 * STEP


def converge(*history: Mutation) -> dict[tuple[Any, ...], dict]:
    """The model's rows for `history`, after checking that the sink shows exactly them for the
    history in order and reversed then again, in batches of one and of everything."""
    expected = CassandraModel(list(history)).select(NOW)
    for deliveries in (list(history), [*history[::-1], *history]):
        for sizes in ([1] * len(deliveries), [len(deliveries)]):
            assert run_sink(deliveries, sizes) == expected
    return expected


def row(**values: Any) -> dict[str, Any]:
    return {column: values.get(column) for column in COLUMNS}


def update(ts: int, **cells: Any) -> Mutation:
    return Mutation("update", ts, ROW, {c: (v, None) for c, v in cells.items()})


def test_an_emptied_collection_alone_makes_no_row() -> None:
    """`SET v4 = null` (or {}) on a row with no live cell leaves no row, and deletes the
    elements an older write (delivered before or after it) gave the column."""
    assert converge(update(TS, v4=None)) == {}
    assert converge(update(TS - STEP, v4=(1, 2)), update(TS, v4=None)) == {}
    assert converge(update(TS, v4=None), update(TS + STEP, v4=(3,))) == {ROW: row(v4=[3])}


def test_an_emptied_collection_leaves_the_row_its_marker_or_another_cell_keeps() -> None:
    """An INSERTed row, or one with another live cell, stays with the collection null."""
    inserted = Mutation("insert", TS - STEP, ROW, {"v1": (1, None), "v4": ((1,), None)})
    assert converge(inserted, update(TS, v4=None)) == {ROW: row(v1=1)}
    assert converge(Mutation("insert", TS, ROW, {"v4": (None, None)})) == {ROW: row()}
    assert converge(update(TS, v1=7, v4=None)) == {ROW: row(v1=7)}
    assert converge(update(TS - STEP, v1=7), update(TS, v1=None, v4=None)) == {}


def test_an_emptied_collection_is_deleted_where_cassandra_deletes_it() -> None:
    """`SET v4 = null` beside a live cell deletes one microsecond below the statement, so
    elements written at its timestamp survive; `DELETE v4` deletes at it, so they do not."""
    assert converge(update(TS, v1=7, v4=None), update(TS, v4=(5,))) == {ROW: row(v1=7, v4=[5])}
    deleted = Mutation("delete_columns", TS, ROW, {"v4": (None, None)})
    assert converge(update(TS, v4=(5,)), deleted) == {}


def test_an_insert_emptying_a_collection_keeps_its_ttl() -> None:
    """`INSERT … (v1, v4) VALUES (1, {}) USING TTL`: the row marker expires with v1 (the
    emptied collection is no cell without a TTL), so the row is gone once it has expired."""
    expired = NOW - STEP
    insert = Mutation(
        "insert", TS, ROW, {"v1": (1, expired), "v4": (None, None)}, marker_expires=expired
    )
    assert converge(insert) == {}


def test_an_empty_frozen_collection_is_a_value() -> None:
    """`SET v5 = []` on a frozen list is a live cell (the row exists, v5 is []); `= null`
    is not."""
    assert converge(update(TS, v5=())) == {ROW: row(v5=[])}
    assert converge(update(TS, v5=None)) == {}
