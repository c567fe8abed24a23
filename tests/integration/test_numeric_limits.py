"""Decimals and varints of every size and encoding against the real stack: those PostgreSQL's
numeric can hold are applied exactly, the others are dead-lettered at once, naming the column
and the limit, and none of them holds up the worker."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from decimal import Decimal
from typing import Any

from cdc_sink.app import SinkApp
from cdc_sink.config import load_config
from tests.support.debezium_avro import (
    WHOLE_SOURCE_FIELDS,
    envelope,
    key_schema,
    register,
    wire,
)
from tests.support.names import Unique
from tests.support.pipeline import (
    Expected,
    Record,
    assert_outcome,
    create_cassandra_table,
    create_topic,
    fetch_rows,
    produce_positions,
    read_topic,
    run_worker,
    sink_env,
)
from tests.support.recon_data import cassandra_session, reconciler_on
from tests.support.stack import Endpoints

TS = 1_900_000_000_000_000
LIMIT = "131072 digits before the decimal point"  # what every refusal of a size must name
STALL_LIMIT_S = 5.0  # no value may hold the event loop this long (heartbeats stop with it)
HUGE = 600_000  # bytes of an unscaled value: far past numeric; minutes to convert naively


def twos(n: int) -> bytes:
    """Big-endian two's complement, as Java's BigInteger.toByteArray() writes it."""
    return n.to_bytes(n.bit_length() // 8 + 1, "big", signed=True)


def with_long_int(record: Record, digit_count: int) -> Record:
    """The record with its "long-int" text replaced by a JSON integer of `digit_count` digits
    (json.dumps cannot write one: Python will not print an int of more than 4300 digits)."""
    key, value = record
    assert value is not None
    return key, value.replace(b'"long-int"', b"9" * digit_count)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def digits(count: int, digit: str = "7") -> Decimal:
    """A whole number of `count` digits (built from text: Python will not print such an int)."""
    return Decimal(digit * count)


def json_record(keyspace: str, pk: int, **cells: Any) -> Record:
    """Debezium's Cassandra INSERT of row `pk` of ks.numbers, JSON without schemas."""
    after = {"pk": {"value": pk, "deletion_ts": None, "set": True}}
    after |= {c: {"value": v, "deletion_ts": None, "set": True} for c, v in cells.items()}
    value = {
        "ts_ms": TS // 1000,
        "op": "i",
        "source": {"ts_us": TS + pk, "keyspace": keyspace, "table": "numbers"},
        "after": after,
    }
    return json.dumps({"pk": pk}).encode(), json.dumps(value).encode()


VARIABLE_SCALE_DECIMAL = {
    "type": "record",
    "name": "VariableScaleDecimal",
    "namespace": "io.debezium.data",
    "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
    "connect.name": "io.debezium.data.VariableScaleDecimal",
}
CONNECT_DECIMAL = {  # varint.handling.mode=precise, as AvroData writes it
    "type": "bytes",
    "logicalType": "decimal",
    "precision": 64,
    "scale": 0,
    "connect.name": "org.apache.kafka.connect.data.Decimal",
    "connect.parameters": {"scale": "0"},
}


class AvroRecords:
    """Avro records of ks.numbers, their schemas registered in the stack's registry."""

    def __init__(self, stack: Endpoints, keyspace: str, subject: str) -> None:
        self.keyspace = keyspace
        namespace = f"ns.{subject.replace('-', '_')}"
        self.key_schema = key_schema(namespace)
        columns = [("pk", "int"), ("d", VARIABLE_SCALE_DECIMAL), ("v", CONNECT_DECIMAL)]
        self.value_schema = envelope(
            columns, namespace=namespace, distinct_names=True, source_fields=WHOLE_SOURCE_FIELDS
        )
        self.key_id, self.value_id = register(
            stack.schema_registry_url, subject, self.key_schema, self.value_schema
        )

    def record(self, pk: int, *, d: dict[str, Any] | None = None, v: bytes | None = None) -> Record:
        def filled(value: Any) -> dict[str, Any] | None:
            return None if value is None else {"value": value, "deletion_ts": None, "set": True}

        datum = {
            "ts_ms": TS // 1000,
            "op": "i",
            "source": {"ts_us": TS + pk, "keyspace": self.keyspace, "table": "numbers"},
            "after": {"pk": filled(pk), "d": filled(d), "v": filled(v)},
        }
        return (
            wire(self.key_id, self.key_schema, {"pk": pk}),
            wire(self.value_id, self.value_schema, datum),
        )


async def run_watching_the_loop(env: dict[str, str]) -> tuple[SinkApp, float]:
    """Run a worker until it has applied everything produced so far; return it and the longest
    time its event loop went without running anything else. A stall past STALL_LIMIT_S stops
    the worker right after it (a stalled worker misses its heartbeats, loses its partitions,
    and reads the same records again: it would never catch up)."""
    worker = SinkApp(load_config(env), stop_when_caught_up=True)
    longest = 0.0

    async def watch() -> None:
        nonlocal longest
        while True:
            began = time.monotonic()
            await asyncio.sleep(0.05)
            longest = max(longest, time.monotonic() - began - 0.05)
            if longest > STALL_LIMIT_S:
                worker.stop()

    watcher = asyncio.create_task(watch())
    try:
        async with asyncio.timeout(300):
            await worker.run()
    finally:
        watcher.cancel()
    return worker, longest


async def test_numbers_beyond_postgresql_are_dead_lettered_at_once_and_the_others_applied_exactly(
    stack: Endpoints, unique: Unique
) -> None:
    """Decimals and varints as Debezium writes them (string mode, precise mode in JSON and in
    Avro, long mode), among them values of 120,000 digits and at the very limit, are applied
    exactly; values PostgreSQL's numeric cannot hold (600 KB unscaled, 131,073 digits, an
    exponent beyond decimal's), a 40,000-character malformed one and a JSON integer longer
    than Python parses are dead-lettered (topic and table) with the column and the limit named,
    without ever holding up the event loop; the worker drains the topic and stops normally."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("numbers")
    topic = unique("cdc-events-numbers")
    dlq_topic = unique("dlq-events")
    create_cassandra_table(
        stack,
        keyspace,
        f"CREATE TABLE {keyspace}.numbers (pk int PRIMARY KEY, d decimal, v varint, "
        "m map<text, varint>) WITH cdc = true",
    )
    await create_topic(stack.kafka, topic)
    avro = AvroRecords(stack, keyspace, topic)
    wide, fraction = digits(120_000), digits(120_000, "3")
    huge = b"\x5a" * HUGE
    good: dict[int, Record] = {
        1: json_record(
            keyspace, 1, d="12" * 2_500 + ".25", v="-" + "9" * 5_000, m={"a": "8" * 5_000}
        ),
        2: json_record(
            keyspace,
            2,
            d={"scale": 7, "value": b64(twos(int(fraction)))},
            v=b64(twos(-int(wide))),
        ),
        3: json_record(keyspace, 3, v="9" * 131_072, d="0." + "1" * 16_383),
        4: avro.record(4, d={"scale": 3, "value": twos(int(fraction))}, v=twos(int(wide))),
    }
    bad: dict[int, Expected] = {
        10: (
            json_record(keyspace, 10, d={"scale": 2, "value": b64(huge)}),
            "ConversionError",
            "convert",
            ("'d'", LIMIT),
        ),
        11: (json_record(keyspace, 11, v=b64(huge)), "ConversionError", "convert", ("'v'", LIMIT)),
        12: (
            json_record(keyspace, 12, m={"a": b64(huge)}),
            "ConversionError",
            "convert",
            ("'m'", LIMIT),
        ),
        13: (
            json_record(keyspace, 13, d="1" * 40_000 + "x"),
            "ConversionError",
            "convert",
            ("'d'", "not a decimal number"),
        ),
        14: (
            json_record(keyspace, 14, d="1e" + "9" * 30),
            "ConversionError",
            "convert",
            ("'d'", LIMIT),
        ),
        15: (
            json_record(keyspace, 15, v="1" + "0" * 131_072),
            "ConversionError",
            "convert",
            ("'v'", LIMIT),
        ),
        16: (
            with_long_int(json_record(keyspace, 16, v="long-int"), 5_000),
            "DecodeError",
            "decode",
            ("4300 digits",),
        ),
        20: (
            avro.record(20, d={"scale": 2, "value": huge}),
            "ConversionError",
            "convert",
            ("'d'", LIMIT),
        ),
        21: (avro.record(21, v=huge), "ConversionError", "convert", ("'v'", LIMIT)),
    }
    records = {1: good[1], 2: good[2], **{pk: b[0] for pk, b in bad.items()}, 3: good[3]}
    records[4] = good[4]
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, dlq__topic=dlq_topic)
    produced = await produce_positions(stack.kafka, topic, records.values())
    position = dict(zip(records, produced, strict=True))
    worker, stalled = await run_watching_the_loop(env)
    assert stalled < STALL_LIMIT_S, f"the event loop stood still for {stalled:.1f} s"

    await assert_outcome(stack.postgres_dsn, schema, position, bad)
    selected = await fetch_rows(
        stack.postgres_dsn, schema, "SELECT pk, d, v, m::text FROM cdc_numbers"
    )
    rows = {r["pk"]: r for r in selected}
    assert sorted(rows) == sorted(good)
    assert rows[1]["d"] == Decimal("12" * 2_500 + ".25")
    assert rows[1]["v"] == Decimal("-" + "9" * 5_000)
    assert json.loads(rows[1]["m"], parse_int=Decimal) == {"a": Decimal("8" * 5_000)}
    assert rows[2]["d"] == Decimal(f"{fraction}E-7")
    assert rows[2]["v"] == wide.copy_negate()
    assert rows[3]["v"] == Decimal("9" * 131_072)
    assert rows[3]["d"] == Decimal("0." + "1" * 16_383)
    assert rows[4]["d"] == Decimal(f"{fraction}E-3")
    assert rows[4]["v"] == wide
    assert len(await read_topic(stack.kafka, dlq_topic)) == len(bad)
    assert worker.applied_events == len(records)


async def test_reconciliation_compares_varints_of_any_length(
    stack: Endpoints, unique: Unique
) -> None:
    """Varints of 5,000 digits, alone and in a map (jsonb keeps every digit; Python parses no
    int past 4,300), compare equal between Cassandra and what the sink wrote; a 300 KB varint
    only Cassandra holds (PostgreSQL's numeric cannot) is a missing row, found without
    converting it: the checksum job succeeds with exactly that difference."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("numbers")
    topic = unique("cdc-events-numbers")
    create_cassandra_table(
        stack,
        keyspace,
        f"CREATE TABLE {keyspace}.numbers (pk int PRIMARY KEY, v varint, "
        "m map<text, varint>) WITH cdc = true",
    )
    long, longer, huge = digits(5_000, "9"), digits(5_000, "8"), 1 << (8 * 300_000)
    values = {1: (int(long), {"a": int(longer), "b": 2}), 2: (-7, {"c": -1}), 3: (huge, None)}
    session = cassandra_session(stack)
    try:
        insert = session.prepare(
            f"INSERT INTO {keyspace}.numbers (pk, v, m) VALUES (?, ?, ?) USING TIMESTAMP ?"
        )
        for pk, (v, m) in values.items():
            session.execute(insert, (pk, v, m, TS + pk))
    finally:
        session.cluster.shutdown()
    await create_topic(stack.kafka, topic)
    events = [
        json_record(keyspace, 1, v=str(long), m={"a": str(longer), "b": "2"}),
        json_record(keyspace, 2, v="-7", m={"c": "-1"}),
        json_record(keyspace, 3, v=b64(twos(huge))),
    ]
    await produce_positions(stack.kafka, topic, events)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    await run_worker(env)
    async with reconciler_on(stack, schema) as reconciler:
        job = await reconciler.run("cdc_numbers", "checksum")
        found = await reconciler.repository.mismatches(job=job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert [(m["kind"], m["row_key"]) for m in found] == [("missing_in_postgres", [3])]
    assert (job["cassandra_rows"], job["postgres_rows"]) == (3, 2)
