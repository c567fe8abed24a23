"""Chunks prepared while a transaction is in flight are merged into the next one in order."""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiokafka import TopicPartition

from cdc_sink.consumer.prepare import Prepared
from cdc_sink.dlq.letters import DeadLetter
from cdc_sink.model.cql import parse_cql_type
from cdc_sink.schema.tables import TableSchema


def _schema(version: int, *extra: str) -> TableSchema:
    columns = {"id": parse_cql_type("int"), **{name: parse_cql_type("text") for name in extra}}
    return TableSchema("ks", "t", "cdc_t", ("id",), columns, version=version)


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
    tp = TopicPartition("cdc-events-t", 0)
    records: list[Any] = [f"record {o}" for o in offsets]
    prepared = Prepared(records)
    prepared.batch.tables = [(schema, [f"mutation {o}" for o in offsets if o not in letters])]  # type: ignore[list-item]
    prepared.batch.dead_letters = [_letter(o) for o in letters]
    prepared.counts = {("cdc-events-t", "cdc_t", "insert"): len(offsets) - len(letters)}
    prepared.stamps = {"cdc_t": [o * 10 for o in offsets if o not in letters]}
    prepared.first = {tp: offsets[0]}
    prepared.last = {tp: offsets[-1]}
    prepared.began_ns, prepared.ready_ns = offsets[0] * 1000, offsets[-1] * 1000 + 1
    return prepared


def test_a_later_chunk_extends_the_next_one_in_offset_order() -> None:
    first = _chunk([10, 11, 12], _schema(1), letters=[11])
    later = _chunk([13, 14], _schema(2, "added"), letters=[])
    first.extend(later)

    tp = TopicPartition("cdc-events-t", 0)
    assert first.records == [f"record {o}" for o in (10, 11, 12, 13, 14)]
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
    first = _chunk([1], _schema(1), letters=[])
    other = TableSchema("ks", "u", "cdc_u", ("id",), {"id": parse_cql_type("int")})
    later = Prepared(["record 2"])
    later.batch.tables = [(other, ["mutation 2"])]  # type: ignore[list-item]
    first.extend(later)
    assert [(s.target, m) for s, m in first.batch.tables] == [
        ("cdc_t", ["mutation 1"]),
        ("cdc_u", ["mutation 2"]),
    ]
