"""A record that makes the sink's own pure code fail unexpectedly is dead-lettered, not fatal.

Without this, one such record would stop the worker, and stop it again after every restart.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from cdc_sink import runner
from cdc_sink.config import load_config
from cdc_sink.ddl import Catalog
from cdc_sink.decode import Decoder
from cdc_sink.model.events import ChangeEvent, Position
from cdc_sink.nesting import MAX_NESTING
from cdc_sink.plan import Mutation
from cdc_sink.runner import Worker
from cdc_sink.tables import TableSchema
from cdc_synth import synth

TOPIC = "cdc-events-users"
USERS = synth.target_schema("users")


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


def worker() -> Worker:
    worker = Worker(load_config({}))
    worker.decoder = Decoder(NoRegistry())
    worker.catalog = Catalog(None, "public", "cdc_{table}")  # type: ignore[arg-type]
    worker.catalog._tables[USERS.target] = USERS  # warm: no PostgreSQL needed
    return worker


def interpret_failing_at(offset: int, error: BaseException) -> Any:
    real = runner.interpret

    def interpret(key: Any, value: Any, position: Position) -> ChangeEvent:
        if position.offset == offset:
            raise error
        return real(key, value, position)

    return interpret


async def test_an_unexpected_failure_in_interpret_dead_letters_only_that_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "interpret", interpret_failing_at(1, KeyError("boom")))
    sent = records(3)
    prepared = await worker()._prepare(sent)

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
    prepared = await worker()._prepare(records(2))

    [letter] = prepared.batch.dead_letters
    assert (letter.offset, letter.error_class, letter.stage) == (0, "UnexpectedError", "convert")
    assert "ZeroDivisionError" in letter.message
    assert [m.event.position.offset for m in prepared.batch.tables[0][1]] == [1]


async def test_running_out_of_memory_is_not_blamed_on_the_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "interpret", interpret_failing_at(0, MemoryError()))
    with pytest.raises(MemoryError):
        await worker()._prepare(records(1))


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
        monkeypatch.setattr(runner, "interpret", out_of_stack)
    else:
        monkeypatch.setattr(TableSchema, "to_mutation", out_of_stack)
    sent = records(2)
    sent[0] = nested_deeper_than_the_limit(sent[0])
    prepared = await worker()._prepare(sent)

    deep, shallow = prepared.batch.dead_letters
    assert (deep.offset, deep.error_class, deep.stage) == (0, poison, stage)
    assert deep.message == f"the record nests deeper than {MAX_NESTING} levels"
    assert (shallow.offset, shallow.error_class, shallow.stage) == (1, "UnexpectedError", stage)
