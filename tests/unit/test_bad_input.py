"""Damaged records end as a PoisonError (dead letter) or as a mutation, never as anything else.

Any other exception would escape the worker's per-record path and stop it; after a restart the
same record would stop it again. Records are the generator's (every table, op and column type,
JSON and Avro), damaged the way bad producers and bit rot damage them: a field replaced by a
value of another JSON type, a field dropped, Avro bytes flipped, cut or appended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_sink.decode.decoder import Decoder
from cdc_sink.errors import DecodeError, EventError, PoisonError
from cdc_sink.model.events import Position, interpret, op_name
from cdc_sink.schema.direct import direct_mutation
from cdc_synth import synth

EVENTS = synth.generate(300, seed=7, start_us=time.time_ns() // 1000)
SCHEMAS = {(synth.KEYSPACE, table): synth.target_schema(table) for table in synth.TABLES}
AVRO_IDS = {table: (2 * n + 1, 2 * n + 2) for n, table in enumerate(synth.TABLES)}
REGISTRY = {
    schema_id: json.dumps(schema)
    for table, ids in AVRO_IDS.items()
    for schema_id, schema in zip(ids, synth.avro_schemas(table), strict=True)
}
JSON_RECORDS = [synth.JsonEncoder().encode(e) for e in EVENTS]
AVRO_RECORDS = [synth.AvroEncoder(AVRO_IDS).encode(e) for e in EVENTS]


class MemoryRegistry:
    """Answers as a Confluent registry does: an unknown id is a DecodeError (HTTP 404)."""

    async def schema_by_id(self, schema_id: int) -> str:
        if schema_id not in REGISTRY:
            raise DecodeError(f"schema id {schema_id} not found")
        return REGISTRY[schema_id]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["", "/10.0.0.1", "1e999", "2024-02-30", "00000000-0000", "\x00"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


def paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place inside a JSON value, as the keys and indexes leading to it."""
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*at, i))


@st.composite
def damaged_json(draw: st.DrawFn, document: bytes) -> bytes:
    value = json.loads(document)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths(value))))
        if not where:
            value = draw(json_values)
            continue
        parent = value
        for step in where[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[where[-1]]
        else:
            parent[where[-1]] = draw(json_values)
    return json.dumps(value).encode()


@st.composite
def damaged_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    body = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["flip", "cut", "append", "drop"]))
        at = draw(st.integers(0, len(body) - 1)) if body else 0
        if how == "flip" and body:
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "cut":
            del body[at:]
        elif how == "append":
            body += draw(st.binary(min_size=1, max_size=8))
        elif body:
            del body[at]
    return bytes(body)


@st.composite
def damaged_records(draw: st.DrawFn) -> tuple[bytes | None, bytes | None]:
    avro = draw(st.booleans())
    key, value = draw(st.sampled_from(AVRO_RECORDS if avro else JSON_RECORDS))
    damage = damaged_bytes if avro else damaged_json
    if draw(st.integers(0, 4)) == 0:
        key = draw(damage(key))
    else:
        value = draw(damage(value))
    return key, value


async def consume(decoder: Decoder, key: bytes | None, value: bytes | None) -> None:
    """The worker's per-record path (`Preparer._to_mutation`) with the catalog already warm:
    the one-pass path, and the three stages, whose mutation it must equal where it gives one."""
    decoded = await decoder.decode(key, value)
    if decoded.value is None:
        return
    position = Position("cdc-events-t", 0, 0)
    direct = direct_mutation(
        lambda keyspace, table: SCHEMAS.get((keyspace, table)), decoded.key, decoded.value, position
    )
    try:
        event = interpret(decoded.key, decoded.value, position)
        schema = SCHEMAS.get((event.keyspace, event.table))
        if schema is None or not event.cells.keys() <= schema.columns.keys():
            assert direct is None
            return  # the catalog would evolve the table, or refuse (tests/integration/test_dlq.py)
        mutation = schema.to_mutation(event)
    except PoisonError:
        assert direct is None  # what the three stages refuse, the one-pass path leaves to them
        raise
    if direct is not None:
        assert repr(direct) == repr((mutation, schema, op_name(event)))


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_the_undamaged_records_all_become_mutations(loop: asyncio.AbstractEventLoop) -> None:
    decoder = Decoder(MemoryRegistry())
    for key, value in JSON_RECORDS + AVRO_RECORDS:
        loop.run_until_complete(consume(decoder, key, value))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=damaged_records())
def test_a_damaged_record_is_poison_or_a_mutation(
    loop: asyncio.AbstractEventLoop, record: tuple[bytes | None, bytes | None]
) -> None:
    decoder = Decoder(MemoryRegistry())
    with contextlib.suppress(PoisonError):  # a dead letter: fine
        loop.run_until_complete(consume(decoder, *record))


def envelope(deletion_ts: Any = None, **source_changes: Any) -> dict[str, Any]:
    source = {"keyspace": "ks", "table": "t", "ts_us": 1_700_000_000_000_000, **source_changes}
    cell = {"value": 1, "deletion_ts": deletion_ts, "set": True}
    return {"op": "u", "source": source, "after": {"v": cell}}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ts_us": "1700000000000000"}, r"source\.ts_us .* is str '1700000000000000', not an"),
        ({"ts_us": 1.7e15}, r"source\.ts_us .* is float 1700000000000000\.0, not an"),
        ({"ts_us": True}, r"source\.ts_us .* is bool True, not an integer"),
        ({"ts_us": None}, r"source\.ts_us \(the write timestamp\) is missing"),
        ({"ts_us": None, "ts_ms": "soon"}, r"source\.ts_ms is str 'soon', not an integer"),
        ({"deletion_ts": "tomorrow"}, r"v\.deletion_ts is str 'tomorrow', not an integer"),
        ({"deletion_ts": {"at": 1}}, r"v\.deletion_ts is dict \{'at': 1\}, not an integer"),
        ({"deletion_ts": 1.5}, r"v\.deletion_ts is float 1\.5, not an integer"),
    ],
)
def test_instants_that_are_not_integers_are_event_errors(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(EventError, match=message):
        interpret({"id": 1}, envelope(**changes), Position("t", 0, 0))


def test_an_older_connector_s_millisecond_timestamp_is_used() -> None:
    event = interpret({"id": 1}, envelope(ts_us=None, ts_ms=1_700_000_000_123), Position("t", 0, 0))
    assert event.ts_us == 1_700_000_000_123_000
