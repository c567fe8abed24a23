"""The operation names events are counted under."""

from __future__ import annotations

import pytest

from cdc_sink.events import Position, interpret, op_name
from tests.support.cassandra_model import Mutation, to_envelope

TS = 1_700_000_000_000_000
MUTATIONS = {
    "insert": Mutation("insert", TS, (0, "a", 1, "x"), {"v1": (1, None)}),
    "update": Mutation("update", TS, (0, "a", 1, "x"), {"v1": (None, None)}),
    "delete": Mutation("delete_row", TS, (0, "a", 1, "x")),
    "partition_delete": Mutation("delete_partition", TS, (0, "a")),
    "range_delete": Mutation("delete_range", TS, (0, "a"), {}, (1,), True, (2,), False),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_each_kind_of_mutation_has_its_own_name(name: str) -> None:
    """Inserts, updates, row, partition and range deletes are named apart."""
    key, value = to_envelope(MUTATIONS[name])
    assert op_name(interpret(key, value, Position("t", 0, 0))) == name


def test_a_snapshot_row_is_named_snapshot() -> None:
    """A row read by the connector's snapshot (op i, source.snapshot true) is `snapshot`."""
    key, value = to_envelope(MUTATIONS["insert"])
    value["source"]["snapshot"] = "true"
    assert op_name(interpret(key, value, Position("t", 0, 0))) == "snapshot"
