"""Chunks prepared while a transaction is in flight are merged into the next one in order."""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from aiokafka import TopicPartition

from cdc_sink.consumer.prepare import Outcome, Prepared
from cdc_sink.dlq.letters import DeadLetter
from cdc_sink.model.cql import parse_cql_type
from cdc_sink.schema.tables import TableSchema


def _schema(version: int, *extra: str) -> TableSchema:
    columns = {"id": parse_cql_type("int"), **{name: parse_cql_type("text") for name in extra}}
    return TableSchema("ks", "t", "cdc_t", ("id",), columns, version=version)


class Record(NamedTuple):
    """What preparing reads of a Kafka record."""

    offset: int
    topic: str = "cdc-events-t"
    partition: int = 0

    @property
    def timestamp(self) -> int:
        return self.offset * 10


def _letter(offset: int) -> DeadLetter:
    return DeadLetter(
        topic="cdc-events-t",
        partition=0,
        offset=offset,
        key=None,
        value=b"x",
        headers=(),
        error_class="DecodeError",
        message="bad",
        stage="decode",
        schema_id=None,
        timestamp_ms=0,
        failed_at=dt.datetime.now(dt.UTC),
    )


def _chunk(offsets: list[int], schema: TableSchema, letters: list[int]) -> Prepared:
    outcomes: list[Outcome] = [
        _letter(o) if o in letters else (f"mutation {o}", schema, "insert")  # type: ignore[misc]
        for o in offsets
    ]
    records = [Record(o) for o in offsets]
    return Prepared.of(records, outcomes, offsets[0] * 1000, offsets[-1] * 1000 + 1)


def test_a_later_chunk_extends_the_next_one_in_offset_order() -> None:
    """The joined chunk holds both chunks' records, rows, letters and counts in order."""
    first = _chunk([10, 11, 12], _schema(1), letters=[11])
    later = _chunk([13, 14], _schema(2, "added"), letters=[])
    first = Prepared.joined([first, later])

    tp = TopicPartition("cdc-events-t", 0)
    assert first.records == [Record(o) for o in (10, 11, 12, 13, 14)]
    ((schema, mutations),) = first.batch.tables
    assert schema.version == 2  # the table grew a column meanwhile: the newer schema applies
    assert mutations == ["mutation 10", "mutation 12", "mutation 13", "mutation 14"]
    assert [d.offset for d in first.batch.dead_letters] == [11]
    assert first.counts == {("cdc-events-t", "cdc_t", "insert"): 4}
    assert first.stamps == {"cdc_t": [100, 120, 130, 140]}
    assert first.first == {tp: 10}
    assert first.last == {tp: 14}
    assert (first.began_ns, first.ready_ns) == (10_000, 14_001)  # its trace span's bounds
    assert first.trace_attributes()["cdc.offsets"] == ["cdc-events-t[0]:10..14"]
    assert first.trace_attributes()["cdc.rows"] == 4
    assert first.trace_attributes()["cdc.dead_letters"] == 1


def test_a_table_first_seen_in_the_later_chunk_is_added() -> None:
    """A table only the later chunk writes follows the earlier chunk's tables."""
    first = _chunk([1], _schema(1), letters=[])
    other = TableSchema("ks", "u", "cdc_u", ("id",), {"id": parse_cql_type("int")})
    later = Prepared.of([Record(2)], [("mutation 2", other, "insert")], 0, 0)  # type: ignore[list-item]
    first = Prepared.joined([first, later])
    assert [(s.target, m) for s, m in first.batch.tables] == [
        ("cdc_t", ["mutation 1"]),
        ("cdc_u", ["mutation 2"]),
    ]
