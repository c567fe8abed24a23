"""The planner agrees with a reference model of Cassandra, whatever the delivery order."""

from __future__ import annotations

import itertools
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_sink.events import Position, interpret
from cdc_sink.plan import (
    TableState,
    apply_mutations,
    is_live,
    settle,
    settle_plan,
    visible_values,
)
from cdc_sink.tables import TableSchema
from cdc_sink.types import parse_cql_type
from tests.support.cassandra_model import (
    C1,
    C2,
    COLUMNS,
    KEY,
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


@st.composite
def mutation(draw: st.DrawFn, ts: int, keys: list[tuple[Any, ...]]) -> Mutation:
    kind = draw(
        st.sampled_from(
            ["insert"] * 4 + ["update"] * 4 + ["delete_row", "delete_partition", "delete_range"]
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
    # The TTL is a function of the timestamp, so two writes sharing a timestamp share it too
    # (see plan._wins on same-timestamp writes with different TTLs).
    ttl = (ts // STEP * 7919) % 150
    expires = ts + ttl * STEP if ttl >= 30 else None
    cells = {}
    for column in columns:
        value = draw(st.one_of(st.none(), values[column]))
        cells[column] = (value, expires if value is not None else None)
    if kind == "insert" and all(value is None for value, _ in cells.values()):
        # Debezium cannot tell an all-null INSERT's TTL; Cassandra's own clients rarely send one.
        cells[columns[0]] = (draw(values[columns[0]]), expires)
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
