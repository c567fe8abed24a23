"""Interpreting events: the names they are counted under, the sources they may name."""

from __future__ import annotations

import pytest

from cdc_sink.errors import EventError
from cdc_sink.model.events import Position, interpret, op_name
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


@pytest.mark.parametrize(
    ("keyspace", "table"),
    [("ks", "t" * 600_000), ("k" * 223, "t"), ("ks", "a-b"), ("k s", "t"), ("ks", "名前")],
)
def test_a_source_no_cassandra_table_can_have_is_refused_before_any_lookup(
    keyspace: str, table: str
) -> None:
    """A keyspace or table name Cassandra would not accept (too long, or not letters, digits
    and _) is the record's error, with the name cut short in the message: looking a 600 KB name
    up in Cassandra's system_schema failed outside every handler and stopped the worker."""
    key, value = to_envelope(MUTATIONS["insert"])
    value["source"].update(keyspace=keyspace, table=table)
    with pytest.raises(EventError, match="is no Cassandra name") as refused:
        interpret(key, value, Position("t", 0, 0))
    assert len(str(refused.value)) < 300


def test_the_longest_cassandra_names_are_accepted() -> None:
    """Names of letters, digits and _ up to the bound pass."""
    key, value = to_envelope(MUTATIONS["insert"])
    value["source"].update(keyspace="Shop_1", table="x" * 222)
    assert interpret(key, value, Position("t", 0, 0)).table == "x" * 222
