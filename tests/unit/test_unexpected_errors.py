"""A record that makes the sink's own pure code fail unexpectedly is dead-lettered, not fatal.

Without this, one such record would stop the worker, and stop it again after every restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from cdc_sink.config import load_config
from cdc_sink.consumer import prepare
from cdc_sink.consumer.prepare import Prepared, Preparer
from cdc_sink.decode.decoder import Decoder
from cdc_sink.decode.nesting import MAX_NESTING
from cdc_sink.model.events import ChangeEvent, Mutation, Position
from cdc_sink.ops.metrics import Metrics
from cdc_sink.retry import RetryPolicy
from cdc_sink.schema.tables import TableSchema
from cdc_synth import synth

TOPIC = "cdc-events-users"
USERS = synth.target_schema("users")
TP = TopicPartition(TOPIC, 0)


class NoRegistry:
    async def schema_by_id(self, schema_id: int) -> str:
        raise AssertionError("JSON records need no registry")


def records(count: int) -> list[Any]:
    events = synth.generate(200, seed=3, start_us=time.time_ns() // 1000)
    encoder = synth.JsonEncoder()
    users = [encoder.encode(e) for e in events if e.table == "users" and e.op == "i"]
    return [
        ConsumerRecord(TOPIC, 0, offset, 0, 0, key, value, None, len(key), len(value), [])
        for offset, (key, value) in enumerate(users[:count])
    ]


class WarmCatalog:
    """Knows the users table already: no PostgreSQL needed. It offers no schema to the
    one-pass path, so every record takes interpret → resolve → to_mutation, the stages these
    tests make fail."""

    def known(self, keyspace: str, table: str) -> None:
        return None

    async def resolve(self, event: ChangeEvent, key_schemas: Any, column_schemas: Any) -> Any:
        return USERS


async def prepare_alone(records: list[Any]) -> Prepared:
    """The worker's preparing stage on its own."""
    retry = RetryPolicy.of(load_config({}).sink)
    preparer = Preparer(Decoder(NoRegistry()), WarmCatalog(), Metrics(), retry, asyncio.Event())
    return await preparer.prepare(records, busy=lambda: False)


def interpret_failing_at(offset: int, error: BaseException) -> Any:
    real = prepare.interpret

    def interpret(key: Any, value: Any, position: Position) -> ChangeEvent:
        if position.offset == offset:
            raise error
        return real(key, value, position)

    return interpret


async def test_an_unexpected_failure_in_interpret_dead_letters_only_that_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prepare, "interpret", interpret_failing_at(1, KeyError("boom")))
    sent = records(3)
    prepared = await prepare_alone(sent)

    [(_, mutations)] = prepared.batch.tables
    assert [m.event.position.offset for m in mutations] == [0, 2]
    [letter] = prepared.batch.dead_letters
    assert (letter.offset, letter.error_class, letter.stage) == (1, "UnexpectedError", "interpret")
    assert letter.message == "KeyError: 'boom'"
    assert letter.value == sent[1].value  # the original bytes, for a replay once fixed


async def test_an_unexpected_failure_in_conversion_dead_letters_only_that_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def convert(schema: TableSchema, event: ChangeEvent) -> Mutation:
        if event.position.offset == 0:
            raise ZeroDivisionError("division by zero")
        return real(schema, event)

    real = TableSchema.to_mutation
    monkeypatch.setattr(TableSchema, "to_mutation", convert)
    prepared = await prepare_alone(records(2))

    [letter] = prepared.batch.dead_letters
    assert (letter.offset, letter.error_class, letter.stage) == (0, "UnexpectedError", "convert")
    assert "ZeroDivisionError" in letter.message
    assert [m.event.position.offset for m in prepared.batch.tables[0][1]] == [1]


async def test_running_out_of_memory_is_not_blamed_on_the_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prepare, "interpret", interpret_failing_at(0, MemoryError()))
    with pytest.raises(MemoryError):
        await prepare_alone(records(1))


def nested_deeper_than_the_limit(record: Any) -> Any:
    """The record with a field nesting MAX_NESTING arrays deep added to its value."""
    envelope = json.loads(record.value)
    extra: Any = 1
    for _ in range(MAX_NESTING):
        extra = [extra]
    envelope.get("payload", envelope)["extra"] = extra
    data = json.dumps(envelope).encode()
    return dataclasses.replace(record, value=data, serialized_value_size=len(data))


@pytest.mark.parametrize(
    ("stage", "poison"), [("interpret", "EventError"), ("convert", "ConversionError")]
)
async def test_running_out_of_stack_on_a_deeply_nested_record_is_that_records_fault(
    monkeypatch: pytest.MonkeyPatch, stage: str, poison: str
) -> None:
    """A RecursionError from a pure stage on a record nesting deeper than MAX_NESTING is that
    record's poison, saying so; on a shallow record it stays a defect."""

    def out_of_stack(*_: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    if stage == "interpret":
        monkeypatch.setattr(prepare, "interpret", out_of_stack)
    else:
        monkeypatch.setattr(TableSchema, "to_mutation", out_of_stack)
    sent = records(2)
    sent[0] = nested_deeper_than_the_limit(sent[0])
    prepared = await prepare_alone(sent)

    deep, shallow = prepared.batch.dead_letters
    assert (deep.offset, deep.error_class, deep.stage) == (0, poison, stage)
    assert deep.message == f"the record nests deeper than {MAX_NESTING} levels"
    assert (shallow.offset, shallow.error_class, shallow.stage) == (1, "UnexpectedError", stage)


async def test_the_parts_of_a_chunk_are_not_decoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bisecting a prepared chunk, or keeping part of it after a rebalance, regroups what was
    prepared: no record is decoded twice, and each part holds its records' mutations and
    dead letters in order."""
    monkeypatch.setattr(prepare, "interpret", interpret_failing_at(1, KeyError("boom")))
    decoded: list[bytes] = []
    real = Decoder.decode

    async def counting(self: Decoder, key: Any, value: Any) -> Any:
        decoded.append(value)
        return await real(self, key, value)

    monkeypatch.setattr(Decoder, "decode", counting)
    chunk = await prepare_alone(records(4))
    first, second = chunk.halves()
    kept = chunk.part(lambda r: r.offset != 2)

    assert len(decoded) == 4
    assert [[m.event.position.offset for m in ms] for _, ms in first.batch.tables] == [[0]]
    assert [d.offset for d in first.batch.dead_letters] == [1]
    assert [m.event.position.offset for m in second.batch.tables[0][1]] == [2, 3]
    assert (second.first, second.last) == ({TP: 2}, {TP: 3})
    assert [m.event.position.offset for m in kept.batch.tables[0][1]] == [0, 3]
    assert sum(kept.counts.values()) == 2
