"""The Cassandra type system of cdc_sink.model: parsing, PostgreSQL column types and value
conversion (no services)."""

from __future__ import annotations

import base64
import json
import math
import random
import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from ipaddress import IPv4Address, IPv6Address
from time import perf_counter
from typing import Any

import pytest
from asyncpg.pgproto.pgproto import UUID as PgUUID

from cdc_sink.apply.codecs import PG_TUPLE_CODECS, use_asyncpg_uuids
from cdc_sink.errors import ConversionError, PoisonError
from cdc_sink.model import scalars
from cdc_sink.model.cql import (
    MAX_TYPE_DEPTH,
    CqlType,
    from_connect_schema,
    parse_cql_type,
    pg_type,
    udt_definitions,
)
from cdc_sink.model.jsonb import dump_json, to_json_value
from cdc_sink.model.scalars import InvalidValue
from cdc_sink.model.values import converter, to_pg, unguarded_converter


@pytest.fixture(autouse=True, scope="module")
def asyncpg_uuids() -> None:
    """UUIDs convert to asyncpg's type, as in the worker (its composition root asks for it)."""
    use_asyncpg_uuids()


SCALARS = {
    "ascii": "text",
    "text": "text",
    "varchar": "text",
    "boolean": "boolean",
    "tinyint": "smallint",
    "smallint": "smallint",
    "int": "integer",
    "bigint": "bigint",
    "counter": "bigint",
    "varint": "numeric",
    "decimal": "numeric",
    "float": "real",
    "double": "double precision",
    "blob": "bytea",
    "uuid": "uuid",
    "timeuuid": "uuid",
    "inet": "inet",
    "timestamp": "timestamptz",
    "date": "date",
    "time": "time",
    "duration": "interval",
}
INT, TEXT = CqlType("int"), CqlType("text")
U1 = "5f0b8f5e-1c8f-4a8b-9b1c-2d3e4f5a6b7c"
ADDRESS = {
    "address": [("street", "text"), ("zip", "varint"), ("tags", "frozen<list<text>>")],
    "person": [("name", "text"), ("home", "frozen<address>")],
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def twos(n: int) -> bytes:
    """n as minimal big-endian two's complement, as Java's BigInteger.toByteArray()."""
    return n.to_bytes((n + (n < 0)).bit_length() // 8 + 1, "big", signed=True)


def pg(cql: str, value: Any) -> Any:
    return to_pg(parse_cql_type(cql), value)


def js(cql: str, value: Any) -> Any:
    """The jsonb text of a value, parsed back with exact decimals."""
    text = pg(cql, value)
    assert isinstance(text, str)
    return json.loads(text, parse_float=Decimal)


# --- parse_cql_type -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCALARS))
def test_parse_every_scalar(name: str) -> None:
    """Every scalar CQL name parses to itself, unfrozen, case-insensitively."""
    assert parse_cql_type(name) == CqlType(name)
    assert parse_cql_type(f"  {name.upper()} ") == CqlType(name)


def test_parse_nested_frozen_map() -> None:
    """frozen<map<text, frozen<list<int>>>> is a frozen map whose value is a frozen list."""
    t = parse_cql_type("frozen<map<text, frozen<list<int>>>>")
    assert t == CqlType("map", (TEXT, CqlType("list", (INT,), frozen=True)), frozen=True)


def test_parse_non_frozen_collection_and_frozen_tuple_element() -> None:
    """A top-level list stays unfrozen; its tuple element is frozen."""
    t = parse_cql_type("list<frozen<tuple<int, text>>>")
    assert t == CqlType("list", (CqlType("tuple", (INT, TEXT), frozen=True),))


def test_parse_bare_nested_collection_is_frozen() -> None:
    """Collections nested in collections are frozen even when the text omits frozen<>."""
    t = parse_cql_type("set<tuple<int, list<text>>>")
    inner = CqlType("tuple", (INT, CqlType("list", (TEXT,), frozen=True)), frozen=True)
    assert t == CqlType("set", (inner,))


def test_parse_udt_with_definitions() -> None:
    """A UDT gets its fields, recursively, from the keyspace's definitions."""
    t = parse_cql_type("frozen<person>", ADDRESS)
    address = CqlType(
        "udt",
        fields=(
            ("street", TEXT),
            ("zip", CqlType("varint")),
            ("tags", CqlType("list", (TEXT,), frozen=True)),
        ),
        frozen=True,
        udt_name="address",
    )
    assert t == CqlType(
        "udt", fields=(("name", TEXT), ("home", address)), frozen=True, udt_name="person"
    )


def test_parse_udt_without_definitions_has_no_fields() -> None:
    """Without definitions a UDT is known by name only; quoted names keep their case."""
    assert parse_cql_type("frozen<address>") == CqlType("udt", frozen=True, udt_name="address")
    assert parse_cql_type('"MyType"') == CqlType("udt", udt_name="MyType")
    assert parse_cql_type("ks.address") == CqlType("udt", udt_name="address")


def test_parse_unknown_udt_when_definitions_are_given() -> None:
    """Given the keyspace's UDTs, a name that is none of them is an error."""
    with pytest.raises(ValueError, match="no type or UDT"):
        parse_cql_type("frozen<nope>", ADDRESS)


def test_parse_self_referencing_udt_is_rejected() -> None:
    """A UDT that (wrongly) contains itself fails instead of recursing forever."""
    with pytest.raises(ValueError, match="itself"):
        parse_cql_type("frozen<loop>", {"loop": [("next", "frozen<loop>")]})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "list<",
        "list<>",
        "map<int>",
        "map<int text>",
        "list<int, int>",
        "frozen<int>",
        "frozen<list<int>, int>",
        "int>",
        "<int>",
        "list<int> int",
        "vector<float, 3>",
        "'org.apache.cassandra.db.marshal.DynamicCompositeType(s=>UTF8Type)'",
        "text<int>",
        "list<int>>",
    ],
)
def test_parse_garbage_raises_value_error(text: str) -> None:
    """Malformed or unsupported type text raises ValueError."""
    with pytest.raises(ValueError, match="invalid CQL type"):
        parse_cql_type(text)


@pytest.mark.parametrize(
    "text",
    [
        "int",
        "list<text>",
        "frozen<set<uuid>>",
        "map<timestamp, frozen<map<text, frozen<tuple<int, blob>>>>>",
        "frozen<address>",
        '"Mixed Case"',
    ],
)
def test_str_is_cql_text_that_parses_back(text: str) -> None:
    """str(CqlType) is Cassandra's type text and parses back to the same type."""
    t = parse_cql_type(text)
    assert parse_cql_type(str(t)) == t


# --- from_connect_schema ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "int64", "name": "io.debezium.time.Timestamp"}, "timestamp"),
        ({"type": "int32", "name": "io.debezium.time.Date"}, "date"),
        ({"type": "string", "name": "io.debezium.data.Uuid"}, "uuid"),
        ({"type": "int64", "name": "io.debezium.time.NanoDuration"}, "duration"),
        ({"type": "struct", "name": "io.debezium.data.VariableScaleDecimal"}, "decimal"),
        (
            {
                "type": "bytes",
                "name": "org.apache.kafka.connect.data.Decimal",
                "parameters": {"scale": "0"},
            },
            "varint",
        ),
        (
            {
                "type": "bytes",
                "name": "org.apache.kafka.connect.data.Decimal",
                "parameters": {"scale": "2"},
            },
            "decimal",
        ),
        ({"type": "int8"}, "tinyint"),
        ({"type": "int16"}, "smallint"),
        ({"type": "int32"}, "int"),
        ({"type": "int64", "optional": True}, "bigint"),
        ({"type": "float"}, "float"),
        ({"type": "double"}, "double"),
        ({"type": "boolean"}, "boolean"),
        ({"type": "string", "name": None}, "text"),
        ({"type": "bytes"}, "blob"),
    ],
)
def test_from_connect_scalars(schema: dict[str, Any], expected: str) -> None:
    """Each Connect type and Debezium logical name maps to its CQL type."""
    assert from_connect_schema(schema) == CqlType(expected)


def test_from_connect_array_and_map() -> None:
    """Arrays are lists, maps are maps; nested collections come back frozen."""
    array = {"type": "array", "items": {"type": "array", "items": {"type": "int32"}}}
    assert from_connect_schema(array) == CqlType("list", (CqlType("list", (INT,), frozen=True),))
    mapping = {"type": "map", "keys": {"type": "string"}, "values": {"type": "double"}}
    assert from_connect_schema(mapping) == CqlType("map", (TEXT, CqlType("double")))


def test_from_connect_tuple_struct() -> None:
    """A struct named ...Tuple with fields field1..N is a frozen tuple."""
    schema = {
        "type": "struct",
        "name": "AsciiShortTuple",
        "fields": [{"field": "field1", "type": "string"}, {"field": "field2", "type": "int16"}],
    }
    expected = CqlType("tuple", (TEXT, CqlType("smallint")), frozen=True)
    assert from_connect_schema(schema) == expected


def test_from_connect_udt_struct() -> None:
    """A struct named <keyspace>.<udt> is that UDT with its fields in order."""
    schema = {
        "type": "struct",
        "name": "shop.address",
        "optional": True,
        "fields": [
            {"field": "street", "type": "string"},
            {"field": "tags", "type": "array", "items": {"type": "string"}},
        ],
    }
    assert from_connect_schema(schema) == CqlType(
        "udt",
        fields=(("street", TEXT), ("tags", CqlType("list", (TEXT,), frozen=True))),
        udt_name="address",
    )


@pytest.mark.parametrize(
    "schema", [{}, {"type": "array"}, {"type": "struct", "fields": [{}]}, {"type": "int128"}]
)
def test_from_connect_malformed_raises_value_error(schema: dict[str, Any]) -> None:
    """Schemas that are not understood raise ValueError."""
    with pytest.raises(ValueError, match="invalid Kafka Connect schema"):
        from_connect_schema(schema)


# --- pg_type ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), sorted(SCALARS.items()))
def test_pg_type_of_every_scalar(name: str, expected: str) -> None:
    """Each scalar maps to DESIGN.md's PostgreSQL type, and list/set of it to its array."""
    assert pg_type(CqlType(name)) == expected
    assert pg_type(parse_cql_type(f"list<{name}>")) == expected + "[]"
    assert pg_type(parse_cql_type(f"frozen<set<{name}>>")) == expected + "[]"


@pytest.mark.parametrize(
    "text",
    [
        "map<text, int>",
        "frozen<tuple<int, text>>",
        "frozen<address>",
        "list<frozen<list<int>>>",
        "set<frozen<tuple<int>>>",
        "list<frozen<address>>",
        "list<frozen<map<int, int>>>",
    ],
)
def test_pg_type_of_non_scalar_structures_is_jsonb(text: str) -> None:
    """Maps, tuples, UDTs and collections of non-scalars are jsonb."""
    assert pg_type(parse_cql_type(text)) == "jsonb"


# --- to_pg: scalars -----------------------------------------------------------------------------

NAN = float("nan")


@pytest.mark.parametrize(
    ("cql", "value", "expected"),
    [
        ("text", "", ""),
        ("text", "héllo 😀 漢字", "héllo 😀 漢字"),
        ("ascii", "plain", "plain"),
        ("varchar", "v", "v"),
        ("boolean", True, True),
        ("boolean", False, False),
        ("tinyint", -128, -128),
        ("smallint", 32767, 32767),
        ("int", -(2**31), -(2**31)),
        ("bigint", 2**63 - 1, 2**63 - 1),
        ("counter", -5, -5),
        ("double", 1.5, 1.5),
        ("double", 3, 3.0),
        ("double", "Infinity", math.inf),
        ("double", "-Infinity", -math.inf),
        ("double", math.inf, math.inf),
        ("float", 0.10000000149011612, 0.10000000149011612),
        ("float", "-Infinity", -math.inf),
        ("blob", b"\x00\xff", b"\x00\xff"),
        ("blob", b64(b"\x00\xff"), b"\x00\xff"),
        ("blob", "", b""),
        # asyncpg's own UUID type (a uuid.UUID), as it returns for uuid columns.
        ("uuid", U1, PgUUID(U1)),
        ("uuid", U1.upper(), PgUUID(U1)),
        ("uuid", "{" + U1 + "}", PgUUID(U1)),
        ("uuid", "urn:uuid:" + U1, PgUUID(U1)),
        ("uuid", uuid.UUID(U1).bytes, PgUUID(U1)),
        (
            "timeuuid",
            "e7d8a6a0-3f1b-11ef-9a4b-0242ac120002",
            PgUUID("e7d8a6a0-3f1b-11ef-9a4b-0242ac120002"),
        ),
        ("inet", "/10.0.0.1", IPv4Address("10.0.0.1")),
        ("inet", "/::1", IPv6Address("::1")),
        ("inet", "/0:0:0:0:0:0:0:1", IPv6Address("::1")),
        ("inet", "host.example/1.2.3.4", IPv4Address("1.2.3.4")),
        ("inet", "1.2.3.4", IPv4Address("1.2.3.4")),
        ("timestamp", 0, datetime(1970, 1, 1, tzinfo=UTC)),
        ("timestamp", -86_400_000, datetime(1969, 12, 31, tzinfo=UTC)),
        ("timestamp", -62_135_596_800_000, datetime(1, 1, 1, tzinfo=UTC)),
        (
            "timestamp",
            253_402_300_799_999,
            datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
        ),
        ("timestamp", "2024-02-29T12:00:00Z", datetime(2024, 2, 29, 12, tzinfo=UTC)),
        ("timestamp", "2024-02-29T13:00:00+01:00", datetime(2024, 2, 29, 12, tzinfo=UTC)),
        ("date", 0, date(1970, 1, 1)),
        ("date", -1, date(1969, 12, 31)),
        ("date", 2_932_896, date(9999, 12, 31)),
        ("date", -719_162, date(1, 1, 1)),
        ("date", "2024-02-29", date(2024, 2, 29)),
        ("time", 49_530_123_456_789, time(13, 45, 30, 123456)),
        ("time", 0, time(0)),
        ("time", 86_399_999_999_999, time(23, 59, 59, 999999)),
        ("time", "13:45:30.123456789", time(13, 45, 30, 123456)),
        ("duration", 0, timedelta(0)),
        ("duration", 33 * 86_400 * 10**9 + 500, timedelta(days=33)),
        (
            "duration",
            90_061_000_001_999,
            timedelta(days=1, hours=1, minutes=1, seconds=1, microseconds=1),
        ),
        ("duration", -1_500, timedelta(microseconds=-1)),
        (
            "decimal",
            "12345678901234567890.123456789012345678",
            Decimal("12345678901234567890.123456789012345678"),
        ),
        ("decimal", "-0.000000000000000000000000000001", Decimal("-1E-30")),
        ("decimal", "1.50", Decimal("1.50")),
        ("decimal", 0.1, Decimal("0.1")),
        ("decimal", 7, Decimal(7)),
        ("decimal", Decimal("2.5"), Decimal("2.5")),
        ("decimal", {"scale": 3, "value": twos(-12345)}, Decimal("-12.345")),
        ("decimal", {"scale": 2, "value": b64(twos(-1))}, Decimal("-0.01")),
        ("decimal", {"scale": 0, "value": b64(twos(2**100))}, Decimal(2**100)),
        ("decimal", {"scale": -3, "value": twos(5)}, Decimal("5E+3")),
        ("decimal", {"scale": 4, "value": b"\x00"}, Decimal("0.0000")),
        ("varint", 2**100, Decimal(2**100)),
        ("varint", -(2**100), Decimal(-(2**100))),
        ("varint", str(2**100), Decimal(2**100)),
        ("varint", "-" + str(2**100), Decimal(-(2**100))),
        ("varint", twos(-(2**100)), Decimal(-(2**100))),
        ("varint", b64(twos(2**100)), Decimal(2**100)),
        ("varint", b64(twos(-129)), Decimal(-129)),
    ],
)
def test_to_pg_scalar_values(cql: str, value: Any, expected: Any) -> None:
    """Each scalar value shape converts to the object asyncpg's binary codec expects."""
    result = pg(cql, value)
    assert result == expected
    assert type(result) is type(expected)
    if isinstance(expected, Decimal):
        assert str(result) == str(expected)  # same digits and scale, not just equal


@pytest.mark.parametrize(
    ("cql", "value"),
    [("double", NAN), ("double", "NaN"), ("float", NAN), ("float", "NaN")],
)
def test_to_pg_float_nan(cql: str, value: Any) -> None:
    """NaN arrives as a float or as the string "NaN" and stays a float NaN."""
    assert math.isnan(pg(cql, value))


@pytest.mark.parametrize("value", [NAN, "NaN"])
def test_to_pg_decimal_nan(value: Any) -> None:
    """Double-mode NaN and string NaN become Decimal NaN (numeric NaN in PostgreSQL)."""
    assert pg("decimal", value).is_nan()


def test_to_pg_decimal_infinity() -> None:
    """Infinite decimals become Decimal infinities (numeric accepts them since PostgreSQL 14)."""
    assert pg("decimal", math.inf) == Decimal("Infinity")
    assert pg("decimal", "-Infinity") == Decimal("-Infinity")


def test_none_stays_none_for_every_type() -> None:
    """None converts to None, whatever the type."""
    for text in [*SCALARS, "list<int>", "map<int, text>", "frozen<tuple<int>>", "frozen<a>"]:
        assert pg(text, None) is None


@pytest.mark.parametrize(
    ("cql", "value", "fragment"),
    [
        ("text", "a\x00b", "NUL"),
        ("ascii", "\x00", "NUL"),
        ("text", "\ud800", "surrogate"),
        ("text", 5, "expected a string"),
        ("boolean", 1, "expected a boolean"),
        ("tinyint", 128, "8-bit"),
        ("smallint", -32769, "16-bit"),
        ("int", 2**31, "32-bit"),
        ("bigint", 2**63, "64-bit"),
        ("int", True, "expected an integer"),
        ("int", "5", "expected an integer"),
        ("double", "nan", "NaN"),
        ("double", 10**400, "too large"),
        ("float", 3.5e38, "32-bit float"),
        ("blob", "not base64!", "base64"),
        ("uuid", "5f0b8f5e-1c8f", "UUID"),
        ("timeuuid", 17, "UUID"),
        ("inet", "/999.1.1.1", "IP address"),
        ("inet", "host/", "IP address"),
        ("timestamp", 253_402_300_800_000, "1..9999"),
        ("timestamp", -62_135_596_800_001, "1..9999"),
        ("timestamp", 10**30, "1..9999"),
        ("timestamp", "yesterday", "ISO 8601"),
        ("date", 2_932_897, "1..9999"),
        ("date", -719_163, "1..9999"),
        ("date", 2**31, "1..9999"),
        ("time", 86_400 * 10**9, "time of day"),
        ("time", -1, "time of day"),
        ("time", "25:00:00", "time of day"),
        ("time", "12:60:00", "nanoseconds"),
        ("duration", 10**30, "too long"),
        ("duration", "P1D", "nanoseconds"),
        ("decimal", "1,5", "decimal number"),
        ("decimal", " 1.5", "decimal number"),
        ("decimal", "sNaN", "decimal number"),
        ("decimal", Decimal("sNaN"), "signaling"),
        ("decimal", "1E+131072", "numeric range"),
        ("decimal", "1E-16384", "numeric range"),
        ("decimal", "1e" + "9" * 30, "numeric range"),  # past even decimal's exponents
        ("decimal", {"scale": 16384, "value": twos(1)}, "numeric range"),
        ("decimal", {"scale": "2", "value": twos(1)}, "scale"),
        ("decimal", {"scale": 2, "value": b""}, "two's complement"),
        ("decimal", True, "expected a decimal"),
        ("varint", "1.5", "base64"),
        ("varint", 1.0, "expected an integer"),
        ("varint", Decimal("1.5"), "expected an integer"),
    ],
)
def test_to_pg_rejects_values_that_cannot_be_stored(cql: str, value: Any, fragment: str) -> None:
    """Unstorable values raise ConversionError naming the CQL type and the problem."""
    with pytest.raises(ConversionError, match=fragment) as caught:
        pg(cql, value)
    assert str(caught.value).startswith(f"{cql}: ")
    assert isinstance(caught.value, PoisonError)
    assert caught.value.stage == "convert"


def test_conversion_error_truncates_huge_values() -> None:
    """The error message shows at most ~80 characters of the offending value."""
    with pytest.raises(ConversionError) as caught:
        pg("text", "x" * 10_000 + "\x00")
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(("cql", "in_a_list"), [("int", False), ("varint", True)])
def test_conversion_error_shows_an_int_too_large_for_repr(cql: str, in_a_list: bool) -> None:
    """Python refuses repr() of ints above 4,300 digits: the message says so instead of the
    error escaping as a ValueError."""
    huge = 10**5000
    with pytest.raises(ConversionError, match="too large to show"):
        pg(cql, [huge] if in_a_list else huge)


# --- numeric's limits ----------------------------------------------------------------------------

NUMERIC_LIMIT = "131072 digits before the decimal point and 16383 after"
BIG = 1_000_000  # bytes of an unscaled value: naively, a minute or more to convert


@pytest.mark.parametrize(
    ("cql", "value"),
    [
        ("varint", b"\x5a" * BIG),
        ("varint", b64(b"\x5a" * BIG)),
        ("varint", 1 << (8 * BIG)),
        ("decimal", {"scale": 10, "value": b"\xa5" * BIG}),
        ("decimal", {"scale": 10, "value": b64(b"\xa5" * BIG)}),
        ("decimal", -(1 << (8 * BIG))),
        ("decimal", scalars.decimal_from_bytes(b"\x5a" * BIG, 0)),
        ("varint", scalars.decimal_from_bytes(b"\x5a" * BIG, 0)),
        ("list<varint>", [b"\x5a" * BIG]),
        ("frozen<list<frozen<list<decimal>>>>", [[{"scale": 0, "value": b"\x5a" * BIG}]]),
    ],
    ids=[
        "varint-bytes",
        "varint-base64",
        "varint-int",
        "decimal-bytes",
        "decimal-base64",
        "decimal-int",
        "decimal-unconverted",
        "varint-unconverted",
        "array",
        "jsonb",
    ],
)
def test_numbers_past_numeric_are_refused_by_their_size_before_converting(
    cql: str, value: Any
) -> None:
    """A decimal or varint whose size alone puts it past PostgreSQL's numeric is refused at
    once, naming the limit, in every shape it arrives in (converting a megabyte to Decimal
    first would hold the worker for minutes)."""
    began = perf_counter()
    with pytest.raises(ConversionError, match=NUMERIC_LIMIT):
        pg(cql, value)
    assert perf_counter() - began < 2.0


def test_decimal_from_bytes_leaves_what_numeric_cannot_hold_unconverted() -> None:
    """decimal_from_bytes gives the exact Decimal of what may fit, an OversizedDecimal (its
    size and scale, shown as such in messages) of what cannot."""
    assert scalars.decimal_from_bytes(twos(-12345), 3) == Decimal("-12.345")
    assert scalars.decimal_from_bytes(b"", 2) == 0
    oversized = scalars.decimal_from_bytes(b"\x01" + b"\x00" * 60_000, 0)
    assert oversized == scalars.OversizedDecimal(60_001, 0)
    assert repr(oversized) == "<60001-byte unscaled value, scale 0>"
    assert isinstance(scalars.decimal_from_bytes(twos(1), 16_384), scalars.OversizedDecimal)


@pytest.mark.parametrize(
    ("unscaled", "scale", "fits"),
    [
        (10**131_072 - 1, 0, True),  # 131072 digits before the point
        (10**131_072, 0, False),
        (-(10**131_072 - 1), 0, True),
        (10**147_455 - 1, 16_383, True),  # and 16383 after
        (10**147_455, 16_383, False),
        (1, 16_383, True),
        (1, 16_384, False),
        (1, -131_071, True),  # 1E+131071: 131072 digits
        (10, -131_071, False),
        (0, -131_071, True),
        (0, -131_072, False),
    ],
    ids=lambda v: f"{v.bit_length()}bits" if isinstance(v, int) and v.bit_length() > 64 else None,
)
def test_numbers_at_numeric_limits(unscaled: int, scale: int, fits: bool) -> None:
    """Exactly what PostgreSQL's numeric holds converts, as bytes and as an int, and one
    digit more does not."""
    shapes: list[Any] = [{"scale": scale, "value": twos(unscaled)}]
    if scale == 0:
        shapes += [unscaled, twos(unscaled)]
    for value in shapes:
        cql = "decimal" if isinstance(value, dict) else "varint"
        if fits:
            assert pg(cql, value) == Decimal(f"{Decimal(unscaled)}E{-scale}")
        else:
            with pytest.raises(ConversionError, match=NUMERIC_LIMIT):
                pg(cql, value)


def test_long_integers_convert_exactly() -> None:
    """Integers of every length up to numeric's, both signs, convert to the same Decimal as
    CPython's own (slower) conversion, from int and from two's complement bytes."""
    rng = random.Random(7)
    for bits in [*range(0, 70), 4095, 4096, 4097, 8192, 8193, 65_536, 100_000, 400_000]:
        for n in (rng.getrandbits(bits), -rng.getrandbits(bits), 1 << bits, -(1 << bits)):
            if n.bit_length() > 435_000:  # past 131072 digits
                continue
            assert pg("varint", n) == Decimal(n)
            assert pg("varint", twos(n)) == Decimal(n)


def test_a_long_malformed_decimal_is_refused_in_linear_time() -> None:
    """A long run of digits that fails at its end is refused at once (a backtracking pattern
    took quadratic time: 16 s for 40,000 characters)."""
    began = perf_counter()
    with pytest.raises(ConversionError, match="not a decimal number"):
        pg("decimal", "1" * 200_000 + "x")
    assert perf_counter() - began < 2.0


# --- nesting ------------------------------------------------------------------------------------


def nested_list(levels: int, leaf: str = "int") -> str:
    return "list<" * (levels - 1) + leaf + ">" * (levels - 1)


def nested_array_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "int32"}
    for _ in range(levels - 1):
        schema = {"type": "array", "items": schema}
    return schema


def test_types_nest_at_most_max_type_depth_levels() -> None:
    """Types nesting MAX_TYPE_DEPTH levels parse, from CQL text and from Connect schemas; one
    more level, or a hundred thousand, is a ValueError (never a RecursionError)."""
    limit = MAX_TYPE_DEPTH
    assert parse_cql_type(nested_list(limit)).name == "list"
    assert from_connect_schema(nested_array_schema(limit)).name == "list"
    for levels in (limit + 1, 100_000):
        with pytest.raises(ValueError, match=f"nested deeper than {limit} levels"):
            parse_cql_type(nested_list(levels))
    with pytest.raises(ValueError, match=f"nested deeper than {limit} levels"):
        from_connect_schema(nested_array_schema(limit + 1))


def test_frozen_adds_no_level_and_udt_fields_add_one() -> None:
    """frozen<> is not a level of its own; a UDT's fields are one level below the UDT."""
    limit = MAX_TYPE_DEPTH
    inner = "frozen<list<frozen<list<int>>>>"  # three levels
    assert parse_cql_type("list<" * (limit - 3) + inner + ">" * (limit - 3)).frozen is False
    chain = {f"u{i}": [("f", f"frozen<u{i + 1}>")] for i in range(1, limit - 1)}
    chain[f"u{limit - 1}"] = [("f", "int")]
    assert parse_cql_type("u1", chain).udt_name == "u1"  # u1 .. u31, then int
    assert parse_cql_type("map<frozen<u2>, frozen<u2>>", chain).name == "map"  # side by side
    with pytest.raises(ValueError, match="nested deeper"):
        parse_cql_type("u0", {**chain, "u0": [("f", "frozen<u1>")]})


def test_values_of_unknown_shape_nest_at_most_max_type_depth_levels() -> None:
    """A UDT whose fields are unknown takes any JSON-like value up to MAX_TYPE_DEPTH levels;
    deeper ones, however deep, are a ConversionError saying so."""
    udt = CqlType("udt", udt_name="anything")

    def nested(levels: int) -> Any:
        value: Any = 1
        for _ in range(levels):
            value = [value]
        return value

    assert json.loads(to_pg(udt, {"a": nested(MAX_TYPE_DEPTH - 1)})) == {
        "a": nested(MAX_TYPE_DEPTH - 1)
    }
    for levels in (MAX_TYPE_DEPTH, 200_000):
        with pytest.raises(ConversionError, match="nested deeper than 32 levels"):
            to_pg(udt, {"a": nested(levels)})


def test_a_value_too_deep_to_print_is_named_so() -> None:
    """A refused value nested past what repr() can print is described, not printed."""
    value: Any = 1
    for _ in range(200_000):
        value = [value]
    with pytest.raises(ConversionError, match="list nested too deeply to show"):
        pg("int", value)


# --- to_pg: arrays ------------------------------------------------------------------------------


def test_list_and_set_become_arrays() -> None:
    """list/set of scalars become Python lists of converted elements (tuples accepted too)."""
    assert pg("list<int>", [3, 1, 2]) == [3, 1, 2]
    assert pg("set<text>", ("a", "", "😀")) == ["a", "", "😀"]
    assert pg("list<uuid>", [U1]) == [uuid.UUID(U1)]
    assert pg("list<decimal>", ["1.10", {"scale": 1, "value": twos(-5)}]) == [
        Decimal("1.10"),
        Decimal("-0.5"),
    ]
    assert pg("frozen<list<inet>>", ["/10.0.0.1"]) == [IPv4Address("10.0.0.1")]
    assert pg("list<timestamp>", [0]) == [datetime(1970, 1, 1, tzinfo=UTC)]
    assert pg("list<blob>", [b64(b"x")]) == [b"x"]
    assert pg("list<int>", []) == []
    floats = pg("list<double>", [1.0, "NaN", "Infinity"])
    assert floats[0] == 1.0
    assert math.isnan(floats[1])
    assert floats[2] == math.inf


@pytest.mark.parametrize(
    ("cql", "value", "fragment"),
    [
        ("list<text>", ["ok", "bad\x00"], "NUL"),
        ("list<int>", [1, 2**40], "32-bit"),
        ("list<int>", "123", "expected a list"),
        ("set<int>", {"a": 1}, "expected a list"),
    ],
)
def test_arrays_reject_bad_elements(cql: str, value: Any, fragment: str) -> None:
    """A bad element or a non-list fails the whole value, naming the collection type."""
    with pytest.raises(ConversionError, match=fragment) as caught:
        pg(cql, value)
    assert str(caught.value).startswith(cql)


# --- to_pg: jsonb -------------------------------------------------------------------------------


def test_map_with_text_keys_from_a_json_object() -> None:
    """A JSON object map becomes jsonb object text, keys in the order received."""
    text = pg("map<text, int>", {"b": 2, "a": 1, "": 0})
    assert text == '{"b":2,"a":1,"":0}'


@pytest.mark.parametrize(
    "value",
    [
        [[1, "one"], [2, "two"]],  # JsonConverter, non-string keys
        [{"key": 1, "value": "one"}, {"key": 2, "value": "two"}],  # Avro MapEntry
        {1: "one", 2: "two"},  # a Python dict with int keys
    ],
)
def test_map_with_int_keys_in_every_shape(value: Any) -> None:
    """All three map shapes give the same jsonb text, int keys rendered as strings."""
    assert pg("map<int, text>", value) == '{"1":"one","2":"two"}'


def test_map_keys_are_rendered_by_their_type() -> None:
    """Keys are converted by the key type: canonical uuid, ISO timestamp, exact decimal."""
    assert js("map<uuid, int>", {U1.upper(): 1}) == {U1: 1}
    assert js("map<timestamp, int>", [[-86_400_000, 1]]) == {"1969-12-31T00:00:00.000Z": 1}
    assert js("map<decimal, int>", {"1.50": 1}) == {"1.50": 1}
    assert js("map<inet, int>", {"/10.0.0.1": 1}) == {"10.0.0.1": 1}
    assert js("map<boolean, int>", [[True, 1]]) == {"true": 1}
    assert js("map<frozen<list<int>>, int>", [[[1, 2], 3]]) == {"[1,2]": 3}


def test_map_values_nested() -> None:
    """Nested maps, lists and tuples inside a map become nested JSON."""
    cql = "map<text, frozen<map<int, frozen<list<frozen<tuple<int, text>>>>>>>"
    value = {"outer": [[7, [{"field1": 1, "field2": "x"}, [2, None]]]]}
    assert js(cql, value) == {"outer": {"7": [[1, "x"], [2, None]]}}


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([[1, "a", "extra"]], "map entry"),
        ([{"k": 1, "v": 2}], "map entry"),
        ({None: "a"}, "null map key"),
        ([[1, "a\x00"]], "NUL"),
        ({"x": "a"}, "expected an integer"),
        (5, "expected a list"),
    ],
)
def test_map_rejects_bad_shapes(value: Any, fragment: str) -> None:
    """Malformed entries, null keys and NUL in values raise ConversionError."""
    with pytest.raises(ConversionError, match=fragment):
        pg("map<int, text>", value)


def test_text_keys_with_nul_are_rejected() -> None:
    """A NUL in a map key cannot go into jsonb either."""
    with pytest.raises(ConversionError, match="NUL"):
        pg("map<text, int>", {"a\x00": 1})


def test_tuple_from_struct_and_from_list() -> None:
    """Tuples arrive as {field1..N} structs or lists and become JSON arrays."""
    cql = "frozen<tuple<int, text, double>>"
    assert pg(cql, {"field1": 1, "field2": "a", "field3": "NaN"}) == '[1,"a","NaN"]'
    assert pg(cql, [1, None, 2.5]) == "[1,null,2.5]"
    assert pg(cql, {"field2": "only"}) == '[null,"only",null]'


@pytest.mark.parametrize("value", [[1, "a"], {"field1": 1, "field4": 2}, "x"])
def test_tuple_rejects_wrong_arity_or_fields(value: Any) -> None:
    """A tuple of the wrong size, with unknown fields or not a tuple raises ConversionError."""
    with pytest.raises(ConversionError):
        pg("frozen<tuple<int, text, int>>", value)


def test_udt_with_known_fields() -> None:
    """A UDT is a JSON object in declared field order, nested UDTs included, exact varint."""
    t = parse_cql_type("frozen<person>", ADDRESS)
    value = {"home": {"zip": 2**70, "street": "Main 1", "tags": ["a"]}, "name": "Ann"}
    text = to_pg(t, value)
    assert text == (
        '{"name":"Ann","home":{"street":"Main 1","zip":1180591620717411303424,"tags":["a"]}}'
    )


def test_udt_missing_fields_are_null_and_unknown_fields_rejected() -> None:
    """Missing UDT fields are null; a field the definition lacks is an error."""
    t = parse_cql_type("frozen<address>", ADDRESS)
    assert to_pg(t, {"street": "x"}) == '{"street":"x","zip":null,"tags":null}'
    with pytest.raises(ConversionError, match="'floor' is not in frozen<address>"):
        to_pg(t, {"street": "x", "floor": 3})


def test_udt_with_unknown_fields_is_rendered_generically() -> None:
    """Without field types a UDT is still stored: bytes base64, NaN as string, exact Decimal."""
    value = {"a": b"\x01", "b": NAN, "c": Decimal("0.10"), "d": [1, {"e": "x"}], "f": None}
    text = pg("frozen<blank>", value)
    assert text == '{"a":"AQ==","b":"NaN","c":0.10,"d":[1,{"e":"x"}],"f":null}'
    with pytest.raises(ConversionError, match="NUL"):
        pg("frozen<blank>", {"a": ["\x00"]})


def test_collections_of_collections_are_jsonb() -> None:
    """A list of lists or of UDTs is stored as jsonb text, not as an array."""
    assert pg("list<frozen<list<int>>>", [[1], [2, 3]]) == "[[1],[2,3]]"
    assert pg("set<frozen<set<text>>>", [["a"]]) == '[["a"]]'


# --- JSON rendering -----------------------------------------------------------------------------


def test_json_decimals_are_exact() -> None:
    """Decimals and varints are JSON numbers with every digit, never rounded through float."""
    cql = "list<frozen<tuple<decimal, varint>>>"
    value = [["12345678901234567890.123456789012345678", -(2**100)]]
    text = pg(cql, value)
    assert text == f"[[12345678901234567890.123456789012345678,{-(2**100)}]]"
    precise = {"scale": 30, "value": b64(twos(-(10**40) - 1))}
    assert js("list<frozen<list<decimal>>>", [[precise]]) == [
        [Decimal("-10000000000.000000000000000000000000000001")]
    ]


def test_json_non_finite_numbers_are_strings() -> None:
    """jsonb has no NaN/Infinity: floats and decimals write them as strings."""
    value = [["NaN", NAN, math.inf, "-Infinity"]]
    assert pg("list<frozen<list<double>>>", value) == '[["NaN","NaN","Infinity","-Infinity"]]'
    assert pg("list<frozen<list<decimal>>>", [["NaN", "Infinity"]]) == '[["NaN","Infinity"]]'


def test_json_float_is_the_shortest_float32_text() -> None:
    """A float from Avro (0.10000000149011612) and from JSON (0.1) render the same in jsonb."""
    assert pg("list<frozen<list<float>>>", [[0.10000000149011612, 0.1, 16777217.0]]) == (
        "[[0.1,0.1,16777216.0]]"
    )
    assert to_json_value(CqlType("float"), 3.4028234663852886e38) == 3.4028235e38


def test_json_scalars_render_as_documented() -> None:
    """Inside jsonb: blob base64, uuid/inet text, ISO instants, ns time, ISO 8601 duration."""
    cql = (
        "frozen<tuple<blob, uuid, inet, timestamp, timestamp, date, time, duration, duration,"
        " duration, duration, boolean, text>>"
    )
    value = [
        b"\x00\xff",
        U1,
        "/::1",
        -62_135_596_800_000,
        "2024-01-01T00:00:00.000001Z",
        -1,
        49_530_123_456_789,
        33 * 86_400 * 10**9 + 500,
        -(86_400 + 7_200) * 10**9,
        0,
        90_061 * 10**9,
        False,
        "😀",
    ]
    assert json.loads(pg(cql, value)) == [
        "AP8=",
        U1,
        "::1",
        "0001-01-01T00:00:00.000Z",
        "2024-01-01T00:00:00.000001Z",
        "1969-12-31",
        "13:45:30.123456789",
        "P33DT0.0000005S",
        "P-1DT-2H",
        "PT0S",
        "P1DT1H1M1S",
        False,
        "😀",
    ]


def test_json_output_is_compact_unicode_and_deterministic() -> None:
    """jsonb text is compact, keeps non-ASCII as is, and equal inputs give equal text."""
    cql = "map<text, frozen<list<text>>>"
    value = {"漢字": ["😀", 'q"uote\\'], "b": []}
    first = pg(cql, value)
    assert first == '{"漢字":["😀","q\\"uote\\\\"],"b":[]}'
    assert pg(cql, dict(value)) == first
    assert pg(cql, [[k, v] for k, v in value.items()]) == first


def test_to_json_value_returns_plain_python() -> None:
    """to_json_value gives JSON-able Python; finite decimals stay Decimal for dump_json."""
    t = parse_cql_type("map<int, frozen<tuple<decimal, timestamp, double>>>")
    value = to_json_value(t, [[1, ["1.0", 0, "NaN"]]])
    assert value == {"1": [Decimal("1.0"), "1970-01-01T00:00:00.000Z", "NaN"]}
    assert dump_json(value) == '{"1":[1.0,"1970-01-01T00:00:00.000Z","NaN"]}'
    assert to_json_value(t, None) is None


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, 2.5, None, True, "x\n\u2028", {}], "é": {"b": []}},
        [],
        "plain",
        -0.0,
        1e300,
    ],
)
def test_dump_json_matches_json_dumps_without_decimals(value: Any) -> None:
    """dump_json writes exactly what json.dumps would with compact separators."""
    assert dump_json(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_dump_json_writes_decimal_digits() -> None:
    """Decimals are written with their own digits and exponent, which JSON accepts."""
    value = {"n": [Decimal("1.10"), Decimal("1E+3"), Decimal("-0.000001")]}
    text = dump_json(value)
    assert text == '{"n":[1.10,1E+3,-0.000001]}'
    assert json.loads(text, parse_float=Decimal) == {
        "n": [Decimal("1.10"), 1000, Decimal("-0.000001")]
    }


# --- converter, codecs --------------------------------------------------------------------------


def test_converter_is_cached_per_type() -> None:
    """Equal types share one converter, so per-cell calls do no type work."""
    assert converter(parse_cql_type("map<int, text>")) is converter(parse_cql_type("map<int,text>"))
    assert to_pg(INT, 5) == converter(INT)(5) == 5


def test_unknown_type_name_is_a_programming_error() -> None:
    """A CqlType with a made-up name fails in pg_type and when its converter is built."""
    with pytest.raises(ValueError, match="unknown CQL type"):
        pg_type(CqlType("bogus"))
    with pytest.raises(ValueError, match="unknown CQL type"):
        converter(CqlType("bogus"))


@pytest.mark.parametrize("text", ["1E+131071", "-1E-16383", "9" * 131072])
def test_decimal_at_the_edges_of_postgres_numeric(text: str) -> None:
    """Decimals up to 131072 integer digits and 16383 fraction digits are accepted."""
    assert pg("decimal", text) == Decimal(text)


@pytest.mark.parametrize(
    "stamp",
    [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 1000, tzinfo=UTC),
        datetime(2000, 1, 1, tzinfo=UTC),
    ],
)
def test_timestamptz_tuple_codec_round_trips(stamp: datetime) -> None:
    """The timestamptz tuple codec keeps every instant, the edges included."""
    encode, decode = PG_TUPLE_CODECS["timestamptz"]
    assert decode(encode(stamp)) == stamp
    assert encode(stamp.replace(tzinfo=None)) == encode(stamp)


@pytest.mark.parametrize(
    "stamp",
    [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC),
    ],
)
def test_timestamptz_codec_takes_micros_since_1970(stamp: datetime) -> None:
    """The writer's own stamps go in as µs since 1970 and encode as the same instant."""
    encode, decode = PG_TUPLE_CODECS["timestamptz"]
    micros = (stamp - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert encode(micros) == encode(stamp)
    assert decode(encode(micros)) == stamp


@pytest.mark.parametrize("micros", [-62_135_596_800_000_001, 253_402_300_800_000_000, 2**63])
def test_timestamptz_codec_refuses_micros_a_datetime_cannot_hold(micros: int) -> None:
    """A stamp outside the years 1..9999 is refused (a data error), never stored unreadable."""
    encode, _ = PG_TUPLE_CODECS["timestamptz"]
    with pytest.raises(OverflowError, match=r"outside the years 1\.\.9999"):
        encode(micros)


@pytest.mark.parametrize("day", [date(1, 1, 1), date(9999, 12, 31), date(2000, 1, 1)])
def test_date_tuple_codec_round_trips(day: date) -> None:
    """The date tuple codec keeps every date, the edges included."""
    encode, decode = PG_TUPLE_CODECS["date"]
    assert decode(encode(day)) == day


def test_tuple_codecs_read_infinity_as_the_extremes() -> None:
    """PostgreSQL's ±infinity read back as the extreme date/datetime."""
    _, decode_date = PG_TUPLE_CODECS["date"]
    _, decode_stamp = PG_TUPLE_CODECS["timestamptz"]
    assert decode_date((2**31 - 1,)) == date.max
    assert decode_date((-(2**31),)) == date.min
    assert decode_stamp((2**63 - 1,)) == datetime.max.replace(tzinfo=UTC)
    assert decode_stamp((-(2**63),)) == datetime.min.replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("cql", "value"),
    [
        ("uuid", "5f0b8f5e-1c8f-4f4e-9a39-3f1c2f4d5e6a"),
        ("inet", "/10.0.0.1"),
        ("decimal", "1.50"),
        ("set<text>", ["a", "b"]),
        ("map<text, int>", {"a": 1}),
        ("frozen<tuple<int, text>>", [1, "x"]),
    ],
)
def test_unguarded_converter_gives_what_converter_gives(cql: str, value: Any) -> None:
    """The hot-loop converter returns the same values as the guarded one."""
    t = parse_cql_type(cql)
    assert unguarded_converter(t)(value) == converter(t)(value)


def test_unguarded_converter_raises_invalid_value_without_the_type() -> None:
    """A value that does not fit raises InvalidValue; converter() words the ConversionError."""
    t = parse_cql_type("smallint")
    with pytest.raises(InvalidValue):
        unguarded_converter(t)(70_000)
    with pytest.raises(ConversionError, match="smallint"):
        converter(t)(70_000)


def test_parsed_uuids_and_addresses_are_remembered_within_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The text -> UUID / address memo never grows past its bound and keeps no failures."""
    monkeypatch.setattr(scalars, "_PARSED_KEPT", 2)
    monkeypatch.setattr(scalars, "_UUIDS", {})
    texts = [str(uuid.UUID(int=n)) for n in range(5)]
    assert [to_pg(parse_cql_type("uuid"), t) for t in texts] == [uuid.UUID(t) for t in texts]
    assert len(scalars._UUIDS) <= 2
    for _ in range(2):
        with pytest.raises(ConversionError, match="not a UUID"):
            to_pg(parse_cql_type("uuid"), "not-a-uuid")
    assert "not-a-uuid" not in scalars._UUIDS


def test_udt_definitions_rebuild_the_types_from_their_text() -> None:
    """udt_definitions lists every UDT used, nested ones too, so that parsing the type texts
    with it gives back the same types, fields included."""
    udts = {
        "address": [("street", "text"), ("geo", "frozen<tuple<double, double>>")],
        "person": [("name", "text"), ("homes", "frozen<list<frozen<address>>>")],
    }
    types = [parse_cql_type("map<text, frozen<person>>", udts), parse_cql_type("int")]
    definitions = udt_definitions(types)
    assert set(definitions) == {"person", "address"}
    assert [parse_cql_type(str(t), definitions) for t in types] == types
    assert udt_definitions([parse_cql_type("list<int>")]) == {}
