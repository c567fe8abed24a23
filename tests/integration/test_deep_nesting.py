"""Records, schemas and API bodies nested deeply enough to exhaust any recursion, against the
real stack: each is a clear error of its own (a dead letter, a 400), never a crash, and
everything else goes on."""

from __future__ import annotations

import asyncio
import json
import struct
import urllib.error
import urllib.request
from typing import Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from cdc_sink.app import SinkApp
from cdc_sink.config import load_config
from tests.support.debezium_avro import wire
from tests.support.names import Unique
from tests.support.pipeline import (
    Expected,
    Record,
    assert_outcome,
    create_topic,
    fetch_rows,
    json_with_schema,
    produce_positions,
    read_topic,
    run_worker,
    sink_env,
)
from tests.support.registry import store_without_validation
from tests.support.stack import Endpoints

# A UDT whose fields the record does not say: its values are taken as they come, any shape.
ANYTHING = {"type": "struct", "name": "ks.anything", "fields": []}
COLUMNS: dict[str, str | dict[str, Any]] = {
    "id": "int32",
    "v": "int32",
    "u": ANYTHING,
    "l": {"type": "array", "items": {"type": "int32", "optional": True}},
}


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def with_deep_array(record: Record, part: int, levels: int) -> Record:
    """The record with the JSON string "DEEP" in its key (part 0) or value (part 1) replaced
    by arrays `levels` deep: json.dumps itself cannot write them."""
    deep = b"[" * levels + b"]" * levels
    parts = [p.replace(b'"DEEP"', deep) if i == part and p else p for i, p in enumerate(record)]
    return parts[0], parts[1]


def array_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "int32", "optional": True}
    for _ in range(levels):
        schema = {"type": "array", "items": schema, "optional": True}
    return schema


def deep_avro_text(levels: int) -> str:
    """An Avro record schema whose field is `levels` arrays deep, as text (too deep for
    json.dumps)."""
    return (
        '{"type": "record", "name": "Deep", "fields": [{"name": "f", "type": '
        + '{"type": "array", "items": ' * levels
        + '"int"'
        + "}" * levels
        + "}]}"
    )


def avro_value(schema_id: int) -> bytes:
    """A Confluent wire-format value of this schema id (its body is never reached)."""
    return b"\x00" + struct.pack(">I", schema_id) + b"\x00"


async def test_deeply_nested_records_and_schemas_are_dead_lettered_and_the_rest_applied(
    stack: Endpoints, unique: Unique
) -> None:
    """Among good JSON records: a value and a key nested 100,000 levels (past the parser's
    stack), a value nested 600 levels in a column of unknown shape (past the converter's), a
    JsonConverter schema and a registered Avro schema nested past 100 levels (5,000: past the
    parser's stack), and a recursive Avro schema are each dead-lettered (DLQ topic and
    `_cdc_dlq_records`) with a message saying so; every good record is applied exactly and the
    worker drains the topic."""
    keyspace, topic, schema = unique("ks"), unique("cdc-events-nest"), unique.schema("nest")
    dlq_topic = unique("dlq-events")
    await create_topic(stack.kafka, topic)
    with SchemaRegistryClient({"url": stack.schema_registry_url}) as client:
        looping = {
            "type": "record",
            "name": "Node",
            "namespace": f"ns.{schema}",
            "fields": [{"name": "next", "type": ["null", "Node"]}],
        }
        looping_id = client.register_schema(
            f"{topic}-looping-value", Schema(json.dumps(looping), "AVRO")
        )
    too_deep_id = store_without_validation(
        stack.schema_registry_url, unique("deep"), deep_avro_text(5_000)
    )

    def record(pk: int, columns: dict[str, Any] = COLUMNS, **cells: Any) -> Record:
        return json_with_schema(keyspace, "nest", columns, {"id": pk}, cells)

    good = {
        pk: (record(pk, v=pk, u={"a": [pk, {"b": nested(3)}]}, l=[pk, None]), pk)
        for pk in range(10)
    }
    bad: dict[int, Expected] = {
        100: (
            with_deep_array(record(100, u="DEEP"), 1, 100_000),
            "DecodeError",
            "decode",
            ("value nests deeper than 100 levels",),
        ),
        101: (
            with_deep_array((b'{"id": "DEEP"}', record(101, v=1)[1]), 0, 100_000),
            "DecodeError",
            "decode",
            ("key nests deeper than 100 levels",),
        ),
        102: (
            record(102, u={"a": nested(600)}),
            "ConversionError",
            "convert",
            ("column 'u': anything: nested deeper than 32 levels",),
        ),
        103: (
            record(103, {**COLUMNS, "x": array_schema(400)}, v=1),
            "DecodeError",
            "decode",
            ("value schema nests deeper than 100 levels",),
        ),
        104: (
            (b'{"id": 104}', avro_value(too_deep_id)),
            "DecodeError",
            "decode",
            (f"writer schema id {too_deep_id} nests deeper than 100 levels",),
        ),
        105: (
            (b'{"id": 105}', wire(looping_id, looping, {"next": {"next": None}})),
            "DecodeError",
            "decode",
            ("contains itself",),
        ),
    }
    records = {pk: r for pk, (r, _) in good.items() if pk < 5}
    records |= {pk: r for pk, (r, *_) in bad.items()}
    records |= {pk: r for pk, (r, _) in good.items() if pk >= 5}
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, dlq__topic=dlq_topic)
    produced = await produce_positions(stack.kafka, topic, records.values())
    position = dict(zip(records, produced, strict=True))
    worker = await run_worker(env)

    await assert_outcome(stack.postgres_dsn, schema, position, bad)
    rows = await fetch_rows(stack.postgres_dsn, schema, "SELECT id, v, u::text, l FROM cdc_nest")
    assert sorted((r["id"], r["v"], json.loads(r["u"]), r["l"]) for r in rows) == [
        (pk, pk, {"a": [pk, {"b": nested(3)}]}, [pk, None]) for pk in sorted(good)
    ]
    assert len(await read_topic(stack.kafka, dlq_topic)) == len(bad)
    assert worker.applied_events == len(records)


def post(port: int, path: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_a_deeply_nested_body_to_a_running_workers_api_is_a_400(
    stack: Endpoints, unique: Unique
) -> None:
    """POST /dlq/replay and /dlq/resume with bodies nested 200,000 levels (past the parser's
    stack) or 101 (past MAX_NESTING) answer 400 saying so, not 500; the API still answers
    a sound body afterwards."""
    topic, schema = unique("cdc-events-api"), unique.schema("api")
    await create_topic(stack.kafka, topic)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    worker = SinkApp(load_config(env))
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(60):
            while worker.http is None or worker.worker.consumer is None:
                await asyncio.sleep(0.1)
        port = worker.http.port
        for path in ("/dlq/replay", "/dlq/resume"):
            for levels in (200_000, 101):
                body = b'{"filter": ' + b"[" * levels + b"]" * levels + b"}"
                status, answer = await asyncio.to_thread(post, port, path, body)
                assert (status, answer) == (
                    400,
                    {"error": "JSON body nests deeper than 100 levels"},
                ), (path, levels)
        status, answer = await asyncio.to_thread(post, port, "/dlq/resume", b'{"topic": "x"}')
        assert (status, answer) == (200, {"resumed": []})
        assert not task.done()
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
