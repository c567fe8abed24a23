"""Generated Avro readers: the same datums as fastavro, the same failures, no schema text as code.

Schemas are drawn at random (every Avro type, the logical types Debezium and AvroData write, the
Debezium envelopes of the generator) and parsed as the decoder parses them; bodies are drawn
byte by byte from the schema, including encodings a Java writer never makes but fastavro reads
(negative block counts with sizes, overlong and negative indexes, any non-zero boolean byte).
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
from decimal import Decimal
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from cdc_sink.decode import avro_codegen
from cdc_sink.decode.avro_codegen import Unsupported, compile_reader
from cdc_sink.decode.decoder import Decoder, _reader_form, rename_redefined_types
from cdc_sink.errors import DecodeError
from cdc_sink.model.scalars import OversizedDecimal
from cdc_synth import synth
from tests.support.debezium_avro import cell, envelope, key_schema, wire
from tests.support.hostile import connect_decimal

HEADER = b"\x00\x00\x00\x00\x07"


def parsed_form(schema: Any) -> Any:
    """The writer schema as the decoder hands it to fastavro (and to the generator)."""
    return fastavro.parse_schema(_reader_form(rename_redefined_types(schema)))


def fastavro_read(parsed: Any, data: bytes) -> tuple[Any, int]:
    """(datum, end) as the decoder reads a body with fastavro."""
    stream = io.BytesIO(data)
    stream.seek(len(HEADER))
    return fastavro.schemaless_reader(stream, parsed, None, return_record_name=False), stream.tell()


def canonical(value: Any) -> Any:
    """A form equal only for values of the same types and the same bits (NaN payloads, -0.0,
    a Decimal's exponent)."""
    if isinstance(value, dict):
        return ("dict", [(canonical(k), canonical(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [canonical(v) for v in value])
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, Decimal | OversizedDecimal):
        return (type(value).__name__, repr(value))
    return (type(value).__name__, value)


# --- schemas ----------------------------------------------------------------------------------

# The value types Debezium's Cassandra connector writes through AvroData, one per CQL type the
# sink maps (text, ascii, varchar and inet are strings; the collections are composed below).
CASSANDRA_VALUES: list[Any] = [
    "string",
    "int",
    {"type": "int", "connect.type": "int16"},
    {"type": "int", "connect.type": "int8"},
    "long",
    "float",
    "double",
    "boolean",
    "bytes",
    {"type": "string", "connect.version": 1, "connect.name": "io.debezium.data.Uuid"},
    {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.Timestamp"},
    {"type": "int", "connect.version": 1, "connect.name": "io.debezium.time.Date"},
    {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.NanoTime"},
    {"type": "long", "connect.version": 1, "connect.name": "io.debezium.time.NanoDuration"},
    connect_decimal(0),  # varint
    connect_decimal(2),  # decimal
    {
        "type": "record",
        "name": "VariableScaleDecimal",
        "fields": [{"name": "scale", "type": "int"}, {"name": "value", "type": "bytes"}],
    },
    # Avro's own logical types, which the decoder reads as their underlying type
    {"type": "string", "logicalType": "uuid"},
    {"type": "int", "logicalType": "date"},
    {"type": "int", "logicalType": "time-millis"},
    {"type": "long", "logicalType": "time-micros"},
    {"type": "long", "logicalType": "timestamp-millis"},
    {"type": "long", "logicalType": "timestamp-micros"},
    {"type": "fixed", "name": "Money", "size": 6, "logicalType": "decimal", "scale": 3},
]

leaves = st.sampled_from(
    [
        "null",
        *CASSANDRA_VALUES,
        {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]},
        {"type": "enum", "name": "E", "symbols": ["ONLY"]},
        {"type": "fixed", "name": "F", "size": 3},
        {"type": "fixed", "name": "F", "size": 0},
    ]
)


def composites(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # Mapped rather than filtered: a filter on a recursive strategy rejects too often.
    not_union = inner.map(
        lambda s: (
            {"type": "record", "name": "U", "fields": [{"name": "u", "type": s}]}
            if isinstance(s, list)
            else s
        )
    )
    fields = st.lists(inner, max_size=4).map(
        lambda types: [{"name": f"f{n}", "type": t} for n, t in enumerate(types)]
    )
    return st.one_of(
        fields.map(lambda f: {"type": "record", "name": "R", "fields": f}),
        inner.map(lambda t: {"type": "array", "items": t}),
        inner.map(lambda t: {"type": "map", "values": t}),
        st.lists(not_union, min_size=1, max_size=4),
        not_union.map(lambda t: ["null", t]),
        # a Debezium cell and a Connect map as AvroData encodes one
        inner.map(lambda t: cell("string" if t == "null" else t)),
        st.tuples(inner, inner).map(
            lambda kv: {
                "type": "array",
                "items": {
                    "type": "record",
                    "name": "MapEntry",
                    "namespace": "io.confluent.connect.avro",
                    "fields": [{"name": "key", "type": kv[0]}, {"name": "value", "type": kv[1]}],
                },
            }
        ),
    )


# Named types reuse their names, as Debezium's cells do: the decoder renames redefinitions.
schemas = st.recursive(leaves, composites, max_leaves=12)


# --- bodies -----------------------------------------------------------------------------------


@st.composite
def varint(draw: st.DrawFn, n: int) -> bytes:
    """The zig-zag varint of n, sometimes padded with redundant zero groups (up to 10 bytes),
    which fastavro reads as the same number."""
    u = ((n << 1) ^ (n >> 63)) & ((1 << 64) - 1)
    groups = []
    while True:
        groups.append(u & 0x7F)
        u >>= 7
        if not u:
            break
    groups += [0] * draw(st.integers(0, 10 - len(groups)) | st.just(0))
    return bytes(g | 0x80 for g in groups[:-1]) + bytes(groups[-1:])


@st.composite
def index(draw: st.DrawFn, count: int) -> bytes:
    """A union or enum index; fastavro also takes -count..-1, counting from the end."""
    return draw(varint(draw(st.integers(-count, count - 1))))


@st.composite
def body(draw: st.DrawFn, schema: Any, named: dict[str, Any]) -> bytes:
    """A body of `schema` (fastavro's parsed form) that fastavro reads without error."""
    if isinstance(schema, str) and schema in named:
        schema = named[schema]
    if isinstance(schema, list):
        n = draw(st.integers(0, len(schema) - 1))
        branch = draw(varint(n) if draw(st.booleans()) else varint(n - len(schema)))
        return branch + draw(body(schema[n], named))
    kind = schema["type"] if isinstance(schema, dict) else schema
    if kind == "null":
        return b""
    if kind == "boolean":
        return draw(st.sampled_from([b"\x00", b"\x01"]) | st.binary(min_size=1, max_size=1))
    if kind in ("int", "long"):
        return draw(varint(draw(st.integers(-(2**63), 2**63 - 1))))
    if kind in ("float", "double"):
        size = 4 if kind == "float" else 8
        return draw(st.binary(min_size=size, max_size=size))
    if kind in ("bytes", "string"):
        raw = (
            draw(st.binary(max_size=40)) if kind == "bytes" else draw(st.text(max_size=12)).encode()
        )
        return draw(varint(len(raw))) + raw
    if kind == "fixed":
        return draw(st.binary(min_size=schema["size"], max_size=schema["size"]))
    if kind == "enum":
        return draw(index(len(schema["symbols"])))
    if kind in ("record", "error"):
        return b"".join(draw(body(f["type"], named)) for f in schema["fields"])
    if kind in ("array", "map"):
        out = b""
        for count in draw(st.lists(st.integers(1, 3), max_size=3)):
            items = b""
            for _ in range(count):
                if kind == "map":
                    items += draw(body("string", named))
                items += draw(body(schema["items" if kind == "array" else "values"], named))
            if draw(st.booleans()):
                out += draw(varint(count)) + items
            else:  # a negative count says the block's size in bytes follows
                out += draw(varint(-count)) + draw(varint(len(items))) + items
        return out + b"\x00"
    raise AssertionError(f"no body for {schema!r}")


@st.composite
def schemas_and_bodies(draw: st.DrawFn) -> tuple[Any, bytes]:
    schema = draw(schemas)
    parsed = parsed_form(schema)
    named = parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
    return parsed, HEADER + draw(body(parsed, named))


def reader_or_skip(parsed: Any) -> avro_codegen.Reader:
    try:
        return compile_reader(parsed)
    except Unsupported:
        assume(False)  # fastavro reads it: tests below cover that path
        raise


PROPERTY = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(case=schemas_and_bodies())
def test_the_generated_reader_returns_what_fastavro_returns(case: tuple[Any, bytes]) -> None:
    """For random schemas and bodies, the generated reader gives the same datum, of the same
    types and bits, and stops at the same byte as the decoder's fastavro read."""
    parsed, data = case
    read = reader_or_skip(parsed)
    expected, end = fastavro_read(parsed, data)
    got, got_end = read(data, len(HEADER))
    assert canonical(got) == canonical(expected)
    assert got_end == end == len(data)


@st.composite
def damaged(draw: st.DrawFn) -> tuple[Any, bytes]:
    parsed, data = draw(schemas_and_bodies())
    body_ = bytearray(data[len(HEADER) :])
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "drop", "byte"]))
        at = draw(st.integers(0, max(len(body_) - 1, 0)))
        if how == "flip" and body_:
            body_[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "byte" and body_:
            body_[at] = draw(st.sampled_from([0x7F, 0x80, 0xFF, 0x01, 0x81]))
        elif how == "cut":
            del body_[at:]
        elif how == "insert":
            body_[at:at] = draw(st.binary(min_size=1, max_size=11))
        elif body_:
            del body_[at]
    return parsed, HEADER + bytes(body_)


@PROPERTY
@given(case=damaged())
def test_a_damaged_body_fails_as_it_does_with_fastavro(case: tuple[Any, bytes]) -> None:
    """A damaged body is a DecodeError from the generated reader exactly when fastavro fails on
    it; when fastavro reads something, the generated reader reads the same."""
    parsed, data = case
    read = reader_or_skip(parsed)
    try:
        expected: Any = fastavro_read(parsed, data)
    except Exception:  # noqa: BLE001 - fastavro fails with many types; the decoder takes all
        with pytest.raises(DecodeError):
            read(data, len(HEADER))
        return
    got, end = read(data, len(HEADER))
    assert (canonical(got), end) == (canonical(expected[0]), expected[1])


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(case=schemas_and_bodies(), data=st.data())
def test_every_cut_short_body_is_a_decode_error(case: tuple[Any, bytes], data: Any) -> None:
    """A body cut anywhere is a DecodeError, never an IndexError or another crash."""
    parsed, whole = case
    read = reader_or_skip(parsed)
    assume(len(whole) > len(HEADER))
    cut = data.draw(st.integers(len(HEADER), len(whole) - 1))
    with pytest.raises(DecodeError):
        read(whole[:cut], len(HEADER))


# --- the generator's Debezium envelopes -------------------------------------------------------

EVENTS = synth.generate(400, seed=11, start_us=time.time_ns() // 1000)
AVRO_IDS = {table: (2 * n + 1, 2 * n + 2) for n, table in enumerate(synth.TABLES)}
SYNTH_SCHEMAS = {
    schema_id: schema
    for table, ids in AVRO_IDS.items()
    for schema_id, schema in zip(ids, synth.avro_schemas(table), strict=True)
}


def test_the_generator_s_records_read_the_same() -> None:
    """Every key and value of the generator's tables and ops reads the same both ways, with
    readers generated for every one of their schemas."""
    parsed = {i: parsed_form(s) for i, s in SYNTH_SCHEMAS.items()}
    readers = {i: compile_reader(p) for i, p in parsed.items()}
    encoder = synth.AvroEncoder(AVRO_IDS)
    for event in EVENTS:
        for data in encoder.encode(event):
            schema_id = int.from_bytes(data[1:5], "big")
            assert canonical(readers[schema_id](data, 5)) == canonical(
                fastavro_read(parsed[schema_id], data)
            )


@PROPERTY
@given(data=st.data())
def test_random_bodies_of_the_generator_s_schemas_read_the_same(data: Any) -> None:
    """Any body of a generator schema, not only the generator's values, reads the same."""
    parsed = parsed_form(data.draw(st.sampled_from(list(SYNTH_SCHEMAS.values()))))
    raw = HEADER + data.draw(body(parsed, parsed["__named_schemas"]))
    got = compile_reader(parsed)(raw, len(HEADER))
    assert canonical(got) == canonical(fastavro_read(parsed, raw))


EVERY_TYPE_COLUMNS = [(f"c{n}", t) for n, t in enumerate(CASSANDRA_VALUES)] + [
    ("list_text", {"type": "array", "items": ["null", "string"]}),
    ("set_uuid", {"type": "array", "items": ["null", CASSANDRA_VALUES[9]]}),
    ("map_text_int", {"type": "map", "values": ["null", "int"]}),
]
EVERY_TYPE = parsed_form(envelope(EVERY_TYPE_COLUMNS))


@PROPERTY
@given(data=st.data())
def test_an_envelope_with_every_cassandra_type_reads_the_same(data: Any) -> None:
    """An envelope with a cell of every Cassandra type the sink maps compiles, and any body of
    it reads the same both ways."""
    raw = HEADER + data.draw(body(EVERY_TYPE, EVERY_TYPE["__named_schemas"]))
    got = compile_reader(EVERY_TYPE)(raw, len(HEADER))
    assert canonical(got) == canonical(fastavro_read(EVERY_TYPE, raw))


class FakeRegistry:
    """Writer schemas by id, served as the registry serves their text."""

    def __init__(self, schemas: dict[int, Any]) -> None:
        self.texts = {i: json.dumps(s) for i, s in schemas.items()}

    async def schema_by_id(self, schema_id: int) -> str:
        await asyncio.sleep(0)
        return self.texts[schema_id]


# --- hostile schemas --------------------------------------------------------------------------

HOSTILE = [
    '"]);import os;os.system("x")#',
    "a\nb'\"\\",
    "ünï\u2028cødé",
    "x}\n    raise SystemExit#",
    "{k0}",
]
HOSTILE_SCHEMA = {
    "type": "record",
    "name": HOSTILE[0],
    "namespace": HOSTILE[1],
    "fields": [
        {"name": HOSTILE[0], "type": "long"},
        {"name": HOSTILE[1], "type": {"type": "enum", "name": HOSTILE[2], "symbols": ["A", "B"]}},
        {
            "name": HOSTILE[3],
            "type": [
                "null",
                {
                    "type": "record",
                    "name": HOSTILE[3],
                    "namespace": HOSTILE[4],
                    "fields": [{"name": HOSTILE[4], "type": "string"}],
                },
            ],
        },
        {"name": HOSTILE[2], "type": {"type": "map", "values": "string"}},
        {"name": HOSTILE[4], "type": f"{HOSTILE[4]}.{HOSTILE[3]}"},
    ],
}
HOSTILE_DATUM = {
    HOSTILE[0]: -3,
    HOSTILE[1]: "B",
    HOSTILE[3]: {HOSTILE[4]: HOSTILE[0]},
    HOSTILE[2]: {HOSTILE[1]: HOSTILE[3]},
    HOSTILE[4]: {HOSTILE[4]: ""},
}


def generated_source(parsed: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """The source compile_reader compiles for a schema, caught on its way to compile()."""
    sources: list[str] = []

    def spy(source: str, *args: Any) -> Any:
        sources.append(source)
        return compile(source, *args)

    monkeypatch.setattr(avro_codegen, "compile", spy, raising=False)
    compile_reader(parsed)
    monkeypatch.undo()
    (source,) = sources
    return source


def test_hostile_names_never_become_source_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record, field and enum names and namespaces built to break out of a string or a line
    leave no trace in the generated source, which holds no string literal at all."""
    parsed = parsed_form(HOSTILE_SCHEMA)
    symbols = {"type": "enum", "name": "E", "symbols": HOSTILE}  # fastavro refuses such symbols
    for schema in (
        parsed,
        {"type": "record", "name": "R", "fields": [{"name": "e", "type": symbols}]},
    ):
        source = generated_source(schema, monkeypatch)
        assert source.isascii()
        assert not set("'\"\\#") & set(source)
        assert not any(name in source for name in HOSTILE if name != "{k0}")


async def test_hostile_names_decode_as_plain_keys() -> None:
    """A record of hostile names decodes through the decoder's generated reader to a dict keyed
    by exactly those names, as fastavro decodes it."""
    decoder = Decoder(FakeRegistry({9: HOSTILE_SCHEMA}))
    data = wire(9, HOSTILE_SCHEMA, HOSTILE_DATUM)
    assert (await decoder.decode(None, data)).value == HOSTILE_DATUM
    assert fastavro_read(parsed_form(HOSTILE_SCHEMA), data)[0] == HOSTILE_DATUM


def test_hostile_enum_symbols_decode_as_themselves() -> None:
    """Enum symbols are data too: each index reads its symbol, whatever characters it holds."""
    schema = {"type": "enum", "name": "E", "symbols": HOSTILE}
    read = compile_reader(schema)
    for n, symbol in enumerate(HOSTILE):
        assert read(bytes([2 * n]), 0) == (symbol, 1)


# --- failures and the decoder's fallback ------------------------------------------------------


@pytest.mark.parametrize("count", [2**62, -(2**62), 2**63 - 1])
def test_a_huge_block_count_fails_at_once(count: int) -> None:
    """A block count larger than the bytes left could hold is a DecodeError before any item is
    read, a negative one (followed by its size) included."""
    read = compile_reader(parsed_form({"type": "array", "items": "long"}))
    u = (count << 1) ^ (count >> 63)
    prefix = bytearray()
    while u > 0x7F:
        prefix.append(u & 0x7F | 0x80)
        u >>= 7
    prefix.append(u)
    size = b"\x02" if count < 0 else b""
    with pytest.raises(DecodeError, match="cannot fit"):
        read(bytes(prefix) + size + b"\x02" * 100, 0)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": "null"},  # any count of zero-byte items is a valid body
        {"type": "array", "items": {"type": "record", "name": "Empty", "fields": []}},
        {"type": "string", "logicalType": "something-new"},
    ],
)
def test_schemas_the_generator_cannot_be_sure_of_are_unsupported(schema: Any) -> None:
    """Items that can take no bytes and unknown logical types are left to fastavro."""
    with pytest.raises(Unsupported):
        compile_reader({"type": "record", "name": "R", "fields": [{"name": "f", "type": schema}]})


async def test_the_decoder_reads_unsupported_schemas_with_fastavro_and_says_so_once() -> None:
    """A writer schema without a generated reader still decodes, with fastavro, and one debug
    line per schema says why; a supported one logs nothing."""
    odd = {
        "type": "record",
        "name": "R",
        "fields": [{"name": "f", "type": {"type": "array", "items": "null"}}],
    }
    decoder = Decoder(FakeRegistry({3: odd, 4: key_schema()}))
    with capture_logs() as logs:
        for _ in range(3):
            assert (await decoder.decode(None, wire(3, odd, {"f": [None, None]}))).value == {
                "f": [None, None]
            }
            assert (await decoder.decode(wire(4, key_schema(), {"pk": 5}), None)).key == {"pk": 5}
    assert [(e["event"], e["schema_id"], e["log_level"]) for e in logs] == [
        ("avro_reader_not_generated", 3, "debug")
    ]
    assert "zero bytes" in logs[0]["reason"]


async def test_a_damaged_body_through_the_decoder_names_the_schema_and_the_fault() -> None:
    """The decoder turns the generated reader's failures into its usual DecodeError: the
    schema id and what was wrong with the bytes."""
    decoder = Decoder(FakeRegistry({4: key_schema()}))
    with pytest.raises(DecodeError, match=r"key Avro body does not match writer schema id 4: Ind"):
        await decoder.decode(b"\x00\x00\x00\x00\x04", None)
    with pytest.raises(DecodeError, match=r"schema id 4: IndexError: union index 5 out of range"):
        await decoder.decode(b"\x00\x00\x00\x00\x04\x0a", None)
