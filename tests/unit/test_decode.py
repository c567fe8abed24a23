"""Decode stage: format detection, Avro through a (fake) registry, JSON with and without schema."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from decimal import Decimal
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cdc_sink.decode.decoder as decoder_module
from cdc_sink.decode.decoder import Decoder, avro_to_connect, rename_redefined_types
from cdc_sink.decode.nesting import MAX_NESTING, deeper_than
from cdc_sink.errors import DecodeError, TransientError
from cdc_sink.model.scalars import OversizedDecimal
from tests.support.debezium_avro import (
    COLUMNS,
    KEY_SCHEMA,
    NS,
    a_cell,
    avro_record,
    compact,
    envelope,
    event,
    wire,
)


class FakeRegistry:
    """In-memory SchemaRegistry that counts calls and can be switched off."""

    def __init__(self, schemas: dict[int, Any]) -> None:
        self.schemas = {i: s if isinstance(s, str) else json.dumps(s) for i, s in schemas.items()}
        self.calls: list[int] = []
        self.down = False

    async def schema_by_id(self, schema_id: int) -> str:
        self.calls.append(schema_id)
        await asyncio.sleep(0)  # a real fetch yields, letting concurrent decodes pile up
        if self.down:
            raise TransientError("registry unreachable")
        if schema_id not in self.schemas:
            raise DecodeError(f"unknown schema id {schema_id}")
        return self.schemas[schema_id]


def registry() -> FakeRegistry:
    return FakeRegistry({1: KEY_SCHEMA, 2: envelope(COLUMNS)})


async def test_avro_key_and_value_round_trip() -> None:
    """Confluent Avro key and value decode to plain dicts with their ids and Connect schemas."""
    key, value = avro_record(pk=a_cell(7), score=a_cell(1.5))
    record = await Decoder(registry()).decode(key, value)
    assert record.key == {"pk": 7}
    assert record.value == event(pk=a_cell(7), score=a_cell(1.5))
    assert (record.schema_id, record.format) == (2, "avro")
    assert record.key_schema == {"pk": {"type": "int32", "optional": True}}
    assert record.column_schemas == {
        "pk": {"type": "int32", "optional": True},
        "name": {"type": "string", "optional": True},
        "score": {"type": "double", "optional": True},
    }


async def test_redefined_cell_value_record_decodes_each_column_by_its_own_definition() -> None:
    """An envelope defining `cell_value` once per column type decodes a string cell as a string."""
    schema = envelope(COLUMNS)
    with pytest.raises(Exception, match="redefined named type"):
        fastavro.parse_schema(schema)  # the bug this works around
    key, value = avro_record(pk=a_cell(1), name=a_cell("Ada Lovelace"), score=a_cell(None))
    record = await Decoder(registry()).decode(key, value)
    assert record.value is not None
    after = record.value["after"]
    assert after["name"] == a_cell("Ada Lovelace")
    assert after["pk"] == a_cell(1)
    assert after["score"] == a_cell(None)
    assert record.column_schemas["name"]["type"] == "string"
    assert "_range_start" not in record.column_schemas


async def test_a_range_tombstone_reads_the_referenced_first_definition() -> None:
    """`_range_end` refers to `clustering_value` by name and decodes with the first definition."""
    bound = {"method": "INCL_END_BOUND", "values": [{"name": "ck", "value": "m", "type": "UTF8"}]}
    key, value = avro_record(pk=a_cell(1), _range_end=bound)
    record = await Decoder(registry()).decode(key, value)
    assert record.value is not None
    assert record.value["after"]["_range_end"] == bound


def test_rename_gives_later_redefinitions_fresh_names_and_keeps_references() -> None:
    """Only 2nd and later definitions are renamed; references and the input stay as they were."""
    schema = envelope(COLUMNS)
    original = copy.deepcopy(schema)
    renamed = rename_redefined_types(schema)
    assert schema == original
    after = renamed["fields"][3]["type"]["fields"]
    assert [f["type"][1]["name"] for f in after[:3]] == [
        "cell_value",
        "cell_value__2",
        "cell_value__3",
    ]
    assert after[4]["type"][1]["fields"][1]["type"]["items"] == "clustering_value"
    fastavro.parse_schema(renamed)  # now acceptable to fastavro


def test_rename_avoids_names_the_schema_already_uses() -> None:
    """A fresh name never collides with a type the schema defines itself, even a later one."""
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "a", "type": {"type": "fixed", "name": "x.F", "size": 1}},
            {"name": "b", "type": {"type": "fixed", "name": "x.F", "size": 2}},
            {"name": "c", "type": {"type": "enum", "name": "F__2", "symbols": ["A"]}},
        ],
    }
    renamed = rename_redefined_types(schema)
    assert [f["type"]["name"] for f in renamed["fields"]] == ["x.F", "x.F__3", "F__2"]
    fastavro.parse_schema(renamed)


def test_rename_resolves_names_within_their_namespace() -> None:
    """Equal short names in different namespaces are different types and are left alone."""
    schema = {
        "type": "record",
        "name": "R",
        "namespace": "a",
        "fields": [
            {"name": "x", "type": {"type": "record", "name": "E", "fields": []}},
            {"name": "y", "type": {"type": "record", "name": "E", "namespace": "b", "fields": []}},
            {"name": "z", "type": {"type": "record", "name": "b.E", "fields": []}},
        ],
    }
    renamed = rename_redefined_types(schema)
    assert [f["type"]["name"] for f in renamed["fields"]] == ["E", "E", "b.E__2"]


def test_rename_handles_redefined_map_entries() -> None:
    """AvroData's MapEntry records, redefined per map column, are renamed like cells."""

    def entry(value_type: str) -> dict[str, Any]:
        return {
            "type": "array",
            "items": {
                "type": "record",
                "name": "MapEntry",
                "namespace": "io.confluent.connect.avro",
                "fields": [{"name": "key", "type": "int"}, {"name": "value", "type": value_type}],
            },
        }

    schema = {
        "type": "record",
        "name": "R",
        "fields": [{"name": "m1", "type": entry("string")}, {"name": "m2", "type": entry("long")}],
    }
    renamed = rename_redefined_types(schema)
    assert renamed["fields"][1]["type"]["items"]["name"] == "MapEntry__2"
    connect = avro_to_connect(schema)
    assert connect["fields"][1] == {
        "field": "m2",
        "type": "map",
        "optional": False,
        "keys": {"type": "int32", "optional": False},
        "values": {"type": "int64", "optional": False},
    }


def test_avro_to_connect_reads_avrodata_metadata() -> None:
    """Connect names, versions, parameters, int16, logical types and unions come back."""
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "s", "type": {"type": "int", "connect.type": "int16"}},
            {
                "name": "t",
                "type": {
                    "type": "long",
                    "connect.name": "io.debezium.time.Timestamp",
                    "connect.version": 1,
                },
            },
            {
                "name": "d",
                "type": {"type": "bytes", "logicalType": "decimal", "precision": 64, "scale": 2},
            },
            {"name": "e", "type": {"type": "enum", "name": "Color", "symbols": ["RED"]}},
            {"name": "u", "type": ["null", "int", "string"]},
            {"name": "m", "type": {"type": "map", "values": "long"}},
        ],
    }
    fields = {f.pop("field"): f for f in avro_to_connect(schema)["fields"]}
    assert fields["s"] == {"type": "int16", "optional": False}
    assert fields["t"] == {
        "type": "int64",
        "optional": False,
        "name": "io.debezium.time.Timestamp",
        "version": 1,
    }
    assert fields["d"] == {
        "type": "bytes",
        "optional": False,
        "name": "org.apache.kafka.connect.data.Decimal",
        "version": 1,
        "parameters": {"scale": "2"},
    }
    assert fields["e"]["type"] == "string"
    assert fields["e"]["parameters"]["io.confluent.connect.avro.Enum"] == "Color"
    assert fields["u"]["name"] == "io.confluent.connect.avro.Union"
    assert fields["u"]["optional"] is True
    assert [f["field"] for f in fields["u"]["fields"]] == ["int", "string"]
    assert fields["m"]["keys"] == {"type": "string", "optional": False}


async def test_avro_values_stay_exact() -> None:
    """Decimals beyond 64 digits stay exact, timestamps stay ints, bytes stay bytes."""
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {
                "name": "varint",
                "type": {"type": "bytes", "logicalType": "decimal", "precision": 64, "scale": 0},
            },
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "blob", "type": "bytes", "default": 5},  # wrong, and irrelevant to reading
        ],
    }
    big = 10**70 + 7
    raw = {
        "varint": big.to_bytes(30, "big", signed=True),
        "ts": 1_730_000_000_123,
        "id": "2b1c6a3e-0000-4000-8000-000000000001",
        "blob": b"\x00\xff",
    }
    plain = {"type": "record", "name": "R", "fields": [
        {"name": "varint", "type": "bytes"},
        {"name": "ts", "type": "long"},
        {"name": "id", "type": "string"},
        {"name": "blob", "type": "bytes"},
    ]}  # fmt: skip
    record = await Decoder(FakeRegistry({5: schema})).decode(None, wire(5, plain, raw))
    assert record.value == {**raw, "varint": Decimal(big)}
    assert record.column_schemas == {}  # not an envelope
    assert record.key is None


async def test_json_with_schema_keeps_payload_and_derives_schemas() -> None:
    """JsonConverter's schema/payload envelope gives the payload and the cells' value schemas."""

    def cell_schema(field: str, value_type: str) -> dict[str, Any]:
        value = {"type": value_type, "optional": True, "field": "value"}
        return {
            "type": "struct",
            "optional": True,
            "name": "cell_value",
            "version": 1,
            "field": field,
            "fields": [
                value,
                {"type": "int64", "optional": True, "field": "deletion_ts"},
                {"type": "boolean", "optional": False, "field": "set"},
            ],
        }

    schema = {
        "type": "struct",
        "name": f"{NS}.Envelope",
        "optional": False,
        "fields": [
            {"type": "int64", "optional": False, "field": "ts_ms"},
            {"type": "string", "optional": False, "field": "op"},
            {
                "type": "struct",
                "optional": False,
                "name": "after",
                "field": "after",
                "fields": [
                    cell_schema("pk", "int32"),
                    cell_schema("name", "string"),
                    {"type": "struct", "optional": True, "field": "_range_start", "fields": []},
                ],
            },
        ],
        # A nested "payload" key puts the envelope's separator inside the schema, too.
        "parameters": {"x": "1", "payload": "2"},
    }
    key_schema = {"type": "struct", "fields": [{"type": "int32", "optional": True, "field": "pk"}]}
    payload = {"ts_ms": 1, "op": "i", "after": {"pk": a_cell(1), "name": a_cell("x" * 3)}}
    key = compact({"schema": key_schema, "payload": {"pk": 1}})
    value = compact({"schema": schema, "payload": payload})
    decoder = Decoder(FakeRegistry({}))
    first = await decoder.decode(key, value)
    again = await decoder.decode(key, value + b"\n")
    spaced = await decoder.decode(key, json.dumps({"schema": schema, "payload": payload}).encode())
    del schema["parameters"]
    unsplit = compact({"schema": schema, "payload": payload})
    uncached = await decoder.decode(key, unsplit)
    cached = await decoder.decode(key, unsplit)  # takes the cached schema, parses the payload only
    for record in (first, again, spaced, uncached, cached):
        assert record.value == payload
        assert record.key == {"pk": 1}
        assert (record.format, record.schema_id) == ("json", None)
        assert record.key_schema == {"pk": {"type": "int32", "optional": True}}
        assert record.column_schemas == {
            "pk": {"type": "int32", "optional": True},
            "name": {"type": "string", "optional": True},
        }


async def test_json_schema_cache_is_not_fooled_by_a_payload_that_looks_alike() -> None:
    """A record whose schema bytes differ is parsed in full, never matched to a cached schema."""
    decoder = Decoder(FakeRegistry({}))
    a = {"type": "struct", "fields": [{"type": "int32", "optional": True, "field": "a"}]}
    b = {"type": "struct", "fields": [{"type": "string", "optional": True, "field": "b"}]}
    for schema, payload in ((a, {"a": 1}), (b, {"b": "x"}), (a, {"a": 2})):
        record = await decoder.decode(compact({"schema": schema, "payload": payload}), None)
        assert record.key == payload
        assert set(record.key_schema) == set(payload)


async def test_schemaless_json() -> None:
    """Plain JSON (schemas.enable=false) decodes as is, with no schemas, big ints exact."""
    value = {"ts_ms": 1, "op": "i", "after": {"pk": a_cell(2**70), "s": None}}
    record = await Decoder(FakeRegistry({})).decode(b' {"pk":1}', json.dumps(value).encode())
    assert record.key == {"pk": 1}
    assert record.value == value
    assert (record.format, record.key_schema, record.column_schemas) == ("json-schemaless", {}, {})


def read_as_the_standard_library(document: bytes) -> tuple[str, str]:
    """(repr of the value, format) json.loads makes of a record, or ("error", its message)."""
    try:
        obj = json.loads(document)
    except ValueError as exc:
        return "error", str(exc)
    enveloped = isinstance(obj, dict) and obj.keys() == {"schema", "payload"}
    payload = obj["payload"] if enveloped else obj
    if payload is not None and not isinstance(payload, dict):
        return "error", "not an object"
    return repr(payload), "json" if enveloped else "json-schemaless"


async def decode_for_comparison(decoder: Decoder, document: bytes) -> tuple[str, str]:
    """What `read_as_the_standard_library` says, as the decoder makes it (an error's message
    only if it contains the expected one)."""
    expected = read_as_the_standard_library(document)
    try:
        record = await decoder.decode(None, document)
    except DecodeError as exc:
        return "error", expected[1] if expected[1] in str(exc) else str(exc)
    return repr(record.value), record.format


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**200), 2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["\u00e9t\u00e9", "\U0001f600", "\ud800", ',"payload":', "\\"])
)
json_trees = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
CONNECT_KEY = {"type": "struct", "fields": [{"type": "int32", "optional": True, "field": "pk"}]}
SHARED_DECODER = Decoder(FakeRegistry({}))  # one for all examples: schemas cached as in a worker


@settings(max_examples=300, deadline=None)
@given(
    payload=st.dictionaries(st.text(max_size=6), json_trees, max_size=4),
    schema=st.sampled_from([CONNECT_KEY, {"type": "struct", "fields": []}, {"type": "string"}]),
    enveloped=st.booleans(),
    ascii_only=st.booleans(),
    spaced=st.booleans(),
)
def test_json_values_are_the_standard_librarys(
    payload: dict[str, Any], schema: Any, enveloped: bool, ascii_only: bool, spaced: bool
) -> None:
    """Every JSON record decodes to exactly what json.loads reads (value, type, format), with a
    schema or without, big ints, floats, NaN, non-ASCII, lone surrogates and nesting included."""
    obj = {"schema": schema, "payload": payload} if enveloped else payload
    separators = (", ", ": ") if spaced else (",", ":")
    document = json.dumps(obj, separators=separators, ensure_ascii=ascii_only).encode(
        "utf-8", "surrogatepass"
    )
    decoded = asyncio.run(decode_for_comparison(SHARED_DECODER, document))
    assert decoded == read_as_the_standard_library(document)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"a":NaN,"b":-Infinity}',
        b'{"a":1e400}',
        b'{"a":"\\ud800"}',
        b'{"a":"\xed\xa0\x80"}',  # a surrogate as UTF-8, which json.loads lets through
        b'{"a":' + b"7" * 4301 + b"}",  # beyond Python's digit limit for int()
        b'{"a":' + b"7" * 4300 + b"}",
        b'{"a":"\xff"}',
        b'{"a":"\x01"}',
        b'{"a":[1,]}',
        b'{"a":1}x',
        b"[1]",
        b'"text"',
    ],
)
async def test_a_cached_schemas_payload_reads_as_the_standard_library_reads_it(
    payload: bytes,
) -> None:
    """Payloads the fast parser refuses, behind a schema already cached, still give json.loads's
    value or its error message (the same dead letter as before)."""
    decoder = Decoder(FakeRegistry({}))
    schema = compact(CONNECT_KEY)
    await decoder.decode(None, b'{"schema":' + schema + b',"payload":{"pk":1}}')
    document = b'{"schema":' + schema + b',"payload":' + payload + b"}"
    decoded = await decode_for_comparison(decoder, document)
    assert decoded == read_as_the_standard_library(document)


async def test_json_schemas_of_one_length_are_told_apart_by_their_bytes() -> None:
    """Schemas of the same length sharing all but their last bytes are cached side by side, and
    each record gets its own schema's fields, never the other's."""
    decoder = Decoder(FakeRegistry({}))

    def schema(kind: str) -> dict[str, Any]:
        return {"type": "struct", "fields": [{"type": kind, "optional": True, "field": "a"}]}

    int32, int64 = schema("int32"), schema("int64")
    assert len(compact(int32)) == len(compact(int64))
    for _ in range(3):
        for kind in (int32, int64):
            record = await decoder.decode(compact({"schema": kind, "payload": {"a": 1}}), None)
            assert record.key_schema == {"a": {"type": kind["fields"][0]["type"], "optional": True}}


async def test_a_cached_json_schema_is_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a schema is known, its records' payloads alone are parsed, also when the payload
    holds a nested "payload" key or trailing whitespace follows the record."""
    decoder = Decoder(FakeRegistry({}))
    head = b'{"schema":' + compact(CONNECT_KEY) + b',"payload":'
    await decoder.decode(head + b'{"pk":1}}', None)
    full_parses: list[bytes] = []
    parse = decoder_module._parse_json
    monkeypatch.setattr(decoder_module, "_parse_json", lambda d: full_parses.append(d) or parse(d))
    for payload, after in (
        (b'{"pk":2}', b""),
        (b'{"pk":3,"m":{"x":1,"payload":2}}', b""),
        (b'{"pk":4}', b"\n "),
    ):
        record = await decoder.decode(head + payload + b"}" + after, None)
        assert record.key == json.loads(payload)
        assert record.key_schema == {"pk": {"type": "int32", "optional": True}}
    assert full_parses == []


async def test_kafka_tombstone_has_no_value() -> None:
    """A null Kafka value is a tombstone: value None, the key still decoded."""
    key, _ = avro_record()
    record = await Decoder(registry()).decode(key, None)
    assert record.key == {"pk": 7}
    assert (record.value, record.column_schemas, record.schema_id) == (None, {}, None)
    assert record.format == "avro"


async def test_unknown_schema_id_is_poison_and_remembered() -> None:
    """An id the registry does not know is a DecodeError; repeats do not ask the registry again."""
    fake = registry()
    decoder = Decoder(fake)
    data = wire(99, KEY_SCHEMA, {"pk": 1})
    for _ in range(3):
        with pytest.raises(DecodeError, match="unknown schema id 99"):
            await decoder.decode(None, data)
    assert fake.calls == [99]


async def test_unknown_id_is_asked_again_after_the_ttl() -> None:
    """Once unknown_id_ttl has passed, the registry is asked again (the id may exist by now)."""
    fake = registry()
    decoder = Decoder(fake, unknown_id_ttl=0.0)
    data = wire(99, KEY_SCHEMA, {"pk": 1})
    with pytest.raises(DecodeError):
        await decoder.decode(None, data)
    fake.schemas[99] = json.dumps(KEY_SCHEMA)
    assert (await decoder.decode(None, data)).value == {"pk": 1}
    assert fake.calls == [99, 99]


async def test_prefetch_asks_for_every_new_id_of_a_chunk_at_once() -> None:
    """The schemas of a chunk's new ids are asked for concurrently, each once; known and
    refused ids, JSON and stand-ins that are not bytes are not asked for; nothing is raised."""
    in_flight, most = 0, 0

    class SlowRegistry(FakeRegistry):
        async def schema_by_id(self, schema_id: int) -> str:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1
            return await super().schema_by_id(schema_id)

    fake = SlowRegistry({1: KEY_SCHEMA, 2: envelope(COLUMNS)})
    decoder = Decoder(fake)
    key, value = avro_record()
    unknown = [wire(1000 + i, KEY_SCHEMA, {"pk": 1}) for i in range(10)]
    await decoder.prefetch([key, value, *unknown, *unknown, b'{"a": 1}', None, object()])
    assert sorted(fake.calls) == [1, 2, *range(1000, 1010)]
    assert most == 12
    assert decoder.refused_ids == 10
    await decoder.prefetch([key, value, *unknown])
    assert len(fake.calls) == 12
    assert (await decoder.decode(key, value)).key == {"pk": 7}


async def test_refused_ids_remembered_are_bounded() -> None:
    """At most `max_refused_ids` refused ids are remembered (random ids never repeat)."""
    decoder = Decoder(registry(), max_refused_ids=4)
    for schema_id in range(100, 120):
        with pytest.raises(DecodeError):
            await decoder.decode(None, wire(schema_id, KEY_SCHEMA, {"pk": 1}))
    assert decoder.refused_ids == 4


async def test_registry_down_is_transient_and_not_cached() -> None:
    """An unreachable registry raises TransientError; once it is back the same record decodes."""
    fake = registry()
    fake.down = True
    key, value = avro_record()
    decoder = Decoder(fake)
    with pytest.raises(TransientError):
        await decoder.decode(key, value)
    fake.down = False
    assert (await decoder.decode(key, value)).key == {"pk": 7}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(20), r"neither Confluent Avro .* 89 50 4e 47 .* \.\.\."),
        (b"", r"0 bytes, starting \(empty\)"),
        (b"plain text", r"neither Confluent Avro .*70 6c 61 69 6e"),
        (b"\x00\x00\x01", "too short for the Confluent wire format header"),
        (b'{"op": "i",', "not valid JSON"),
        (b"[1, 2]", "JSON is an array, not an object"),
        (b'{"schema": null, "payload": "text"}', "JSON is a string, not an object"),
        (b'{"a": "\xff"}', "not valid JSON"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "value nests deeper than 100 levels"),
    ],
)
async def test_undecodable_bytes_are_poison(data: bytes, message: str) -> None:
    """Garbage, short headers, bad JSON and non-objects raise a DecodeError that says what."""
    with pytest.raises(DecodeError, match=message) as raised:
        await Decoder(registry()).decode(None, data)
    assert raised.value.stage == "decode"


async def test_truncated_or_mismatched_avro_is_poison() -> None:
    """A cut-off body, trailing bytes, or a body of another schema raise DecodeError."""
    decoder = Decoder(registry())
    _, value = avro_record(pk=a_cell(1), name=a_cell("a long enough name"))
    with pytest.raises(DecodeError, match="does not match writer schema id 2: EOFError"):
        await decoder.decode(None, value[:-12])
    with pytest.raises(DecodeError, match="1 bytes left after the Avro datum"):
        await decoder.decode(None, value + b"\x00")
    with pytest.raises(DecodeError, match="schema id 1"):
        await decoder.decode(None, b"\x00\x00\x00\x00\x01" + value[5:])  # key schema, value body
    with pytest.raises(DecodeError, match="key Avro body does not match writer schema id 2"):
        await decoder.decode(b"\x00\x00\x00\x00\x02\x02", None)


async def test_unusable_writer_schemas_are_poison() -> None:
    """Schema text that is not JSON, or not Avro, makes its records DecodeErrors."""
    undefined = {"type": "record", "name": "R", "fields": [{"name": "x", "type": "Undefined"}]}
    decoder = Decoder(FakeRegistry({3: "{not json", 4: undefined}))
    with pytest.raises(DecodeError, match="schema id 3 is not JSON"):
        await decoder.decode(None, b"\x00\x00\x00\x00\x03\x00")
    with pytest.raises(DecodeError, match="schema id 4 is not a usable Avro schema"):
        await decoder.decode(None, b"\x00\x00\x00\x00\x04\x00")


@pytest.mark.parametrize(
    "schema",
    [
        # no way out: no finite datum exists
        {"type": "record", "name": "R", "fields": [{"name": "r", "type": "R"}]},
        # a linked list: 0.5 MB of 0x02 bytes would nest 500,000 deep
        {"type": "record", "name": "N", "fields": [{"name": "next", "type": ["null", "N"]}]},
        # through another record and an array, with a namespace
        {
            "type": "record",
            "name": "a.Tree",
            "fields": [
                {
                    "name": "kids",
                    "type": {
                        "type": "array",
                        "items": {
                            "type": "record",
                            "name": "Kid",
                            "fields": [{"name": "t", "type": "Tree"}],
                        },
                    },
                }
            ],
        },
    ],
)
async def test_recursive_writer_schemas_are_poison(schema: dict[str, Any]) -> None:
    """fastavro reads recursive types by recursing in C, and a deep enough datum kills the
    process (a segmentation fault, not an exception): such schemas are refused up front."""
    decoder = Decoder(FakeRegistry({5: schema}))
    with pytest.raises(DecodeError, match=r"schema id 5 is not a usable Avro schema: .*contains"):
        await decoder.decode(None, b"\x00\x00\x00\x00\x05" + b"\x02" * 500_000 + b"\x00")


def nested_arrays(levels: int) -> dict[str, Any]:
    """A record schema whose one field is `levels` arrays deep."""
    inner: Any = "int"
    for _ in range(levels):
        inner = {"type": "array", "items": inner}
    return {"type": "record", "name": "Deep", "fields": [{"name": "f", "type": inner}]}


def nested_datum(levels: int) -> Any:
    value: Any = 5
    for _ in range(levels):
        value = [value]
    return value


async def test_a_writer_schema_nesting_up_to_the_limit_decodes() -> None:
    """A writer schema of exactly MAX_NESTING levels (97 arrays in a record) is read."""
    schema = nested_arrays(MAX_NESTING - 3)
    assert not deeper_than(schema)
    decoder = Decoder(FakeRegistry({5: schema}))
    datum = {"f": nested_datum(MAX_NESTING - 3)}
    assert (await decoder.decode(None, wire(5, schema, datum))).value == datum


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(nested_arrays(MAX_NESTING - 2)),
        '{"type": "record", "name": "R", "fields": [{"name": "f", "type": '
        + '{"type": "array", "items": ' * 5_000
        + '"int"'
        + "}" * 5_000
        + "}]}",  # parsing it alone runs out of stack
        '{"type": "record", "name": "R", "x": ' + "[" * 200_000 + "]" * 200_000 + "}",
    ],
    ids=["one-level-too-many", "five-thousand", "two-hundred-thousand"],
)
async def test_writer_schemas_nesting_too_deeply_are_poison(text: str) -> None:
    """A writer schema nesting past MAX_NESTING levels, however deep, is a DecodeError saying
    so; parsing, renaming, converting and reading it all recurse."""
    decoder = Decoder(FakeRegistry({5: text}))
    with pytest.raises(DecodeError, match="schema id 5 nests deeper than 100 levels"):
        await decoder.decode(None, b"\x00\x00\x00\x00\x05\x00")


async def test_a_json_records_schema_nesting_too_deeply_is_poison() -> None:
    """JsonConverter's embedded schema is held to MAX_NESTING levels too."""
    schema: dict[str, Any] = {"type": "int32"}
    for _ in range(MAX_NESTING):
        schema = {"type": "array", "items": schema}
    data = compact({"schema": schema, "payload": {"op": "c"}})
    with pytest.raises(DecodeError, match="value schema nests deeper than 100 levels"):
        await Decoder(registry()).decode(None, data)


async def test_avro_decimals_convert_only_when_a_numeric_can_hold_them() -> None:
    """Connect Decimals (bytes and fixed) read as exact Decimals; one whose size alone rules out
    PostgreSQL's numeric stays unconverted, an OversizedDecimal, and costs no conversion."""
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {
                "name": "b",
                "type": {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2},
            },
            {
                "name": "f",
                "type": {
                    "type": "fixed",
                    "name": "F",
                    "size": 3,
                    "logicalType": "decimal",
                    "precision": 6,
                    "scale": 1,
                },
            },
        ],
    }
    plain = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "b", "type": "bytes"},
            {"name": "f", "type": {"type": "fixed", "name": "F", "size": 3}},
        ],
    }
    decoder = Decoder(FakeRegistry({5: schema}))
    exact = (12_345_678_901).to_bytes(5, "big", signed=True)  # more digits than declared
    record = await decoder.decode(None, wire(5, plain, {"b": exact, "f": b"\xff\xff\xfe"}))
    assert record.value == {"b": Decimal("123456789.01"), "f": Decimal("-0.2")}
    huge = b"\x11" * 1_000_000
    began = time.perf_counter()
    record = await decoder.decode(None, wire(5, plain, {"b": huge, "f": b"\x00\x00\x01"}))
    assert time.perf_counter() - began < 2.0
    assert record.value == {"b": OversizedDecimal(1_000_000, 2), "f": Decimal("0.1")}


@pytest.mark.parametrize("scale", [-1, "2", 1.5])
async def test_an_avro_decimal_of_an_invalid_scale_is_poison(scale: Any) -> None:
    """A decimal whose scale is not a whole number makes the writer schema unusable."""
    decimal = {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": scale}
    schema = {"type": "record", "name": "R", "fields": [{"name": "b", "type": decimal}]}
    decoder = Decoder(FakeRegistry({5: schema}))
    with pytest.raises(DecodeError, match=r"not a usable Avro schema: .*scale"):
        await decoder.decode(None, b"\x00\x00\x00\x00\x05\x02\x01")


async def test_a_named_type_used_twice_side_by_side_is_not_recursion() -> None:
    point = {"type": "record", "name": "P", "fields": [{"name": "x", "type": "int"}]}
    schema = {
        "type": "record",
        "name": "Line",
        "fields": [{"name": "a", "type": point}, {"name": "b", "type": "P"}],
    }
    decoder = Decoder(FakeRegistry({6: schema}))
    decoded = await decoder.decode(None, b"\x00\x00\x00\x00\x06\x02\x04")
    assert decoded.value == {"a": {"x": 1}, "b": {"x": 2}}


async def test_registry_is_asked_once_per_schema_id() -> None:
    """Many records of two ids cost two registry calls, and share their column schemas."""
    fake = registry()
    decoder = Decoder(fake)
    records = [await decoder.decode(*avro_record(pk=a_cell(i))) for i in range(5)]
    assert sorted(fake.calls) == [1, 2]
    assert records[0].column_schemas is records[4].column_schemas


async def test_concurrent_records_of_a_new_id_share_one_registry_call() -> None:
    """50 records of an unseen id decoded concurrently make exactly one registry call."""
    fake = registry()
    decoder = Decoder(fake)
    _, value = avro_record(pk=a_cell(3))
    records = await asyncio.gather(*(decoder.decode(None, value) for _ in range(50)))
    assert fake.calls == [2]
    assert all(r.value == records[0].value for r in records)
