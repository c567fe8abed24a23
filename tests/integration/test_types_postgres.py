"""Every Cassandra type, converted by cdc_sink.model, round-trips through real PostgreSQL.

Each case creates a table with one column of pg_type(t), writes to_pg(t, value) with asyncpg's
binary COPY (as the sink does) and reads it back; jsonb comes back as text and is compared
parsed, with exact decimals.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import asyncpg
import pytest

from cdc_sink.apply.codecs import PG_TUPLE_CODECS
from cdc_sink.model.cql import parse_cql_type, pg_type
from cdc_sink.model.values import to_pg
from tests.support.names import Unique
from tests.support.stack import Endpoints

U1 = "5f0b8f5e-1c8f-4a8b-9b1c-2d3e4f5a6b7c"
U2 = "e7d8a6a0-3f1b-11ef-9a4b-0242ac120002"
NAN, INF = float("nan"), float("inf")
UDTS = {
    "address": [("street", "text"), ("zip", "varint"), ("geo", "frozen<tuple<double, double>>")],
    "person": [("name", "text"), ("homes", "frozen<list<frozen<address>>>")],
}


def twos(n: int) -> bytes:
    """n as minimal big-endian two's complement, as Java's BigInteger.toByteArray()."""
    return n.to_bytes((n + (n < 0)).bit_length() // 8 + 1, "big", signed=True)


@dataclass(frozen=True)
class Case:
    cql: str
    value: Any
    expected: Any  # what SELECT returns (jsonb: the parsed JSON, decimals exact)
    text: str | None = None  # the value as PostgreSQL prints it (output function)

    def __str__(self) -> str:
        return f"{self.cql}={self.value!r}"[:60]


CASES = [
    Case("text", "", "", ""),
    Case("text", "héllo 😀 漢字", "héllo 😀 漢字"),
    Case("ascii", "plain", "plain"),
    Case("varchar", "v", "v"),
    Case("boolean", True, True),
    Case("tinyint", -128, -128),
    Case("smallint", 32767, 32767),
    Case("int", -(2**31), -(2**31)),
    Case("bigint", 2**63 - 1, 2**63 - 1),
    Case("counter", -(2**63), -(2**63)),
    Case("varint", 2**100, Decimal(2**100), str(2**100)),
    Case("varint", str(-(2**100)), Decimal(-(2**100)), str(-(2**100))),
    Case("varint", base64.b64encode(twos(-(2**70))).decode(), Decimal(-(2**70))),
    Case(
        "decimal",
        "12345678901234567890.123456789012345678",
        Decimal("12345678901234567890.123456789012345678"),
        "12345678901234567890.123456789012345678",
    ),
    Case("decimal", {"scale": 5, "value": twos(-1234567)}, Decimal("-12.34567"), "-12.34567"),
    Case(
        "decimal",
        {"scale": 20, "value": base64.b64encode(twos(-(10**30) - 7)).decode()},
        Decimal("-10000000000.00000000000000000007"),
    ),
    Case("decimal", "1.50", Decimal("1.50"), "1.50"),
    Case("decimal", "1E-16383", Decimal("1E-16383")),
    # asyncpg reads numeric in base-10000 digits, hence its exponent form of the same value.
    Case("decimal", "-1E+131071", Decimal("-1.000E+131071"), "-1" + "0" * 131071),
    Case("decimal", 0.1, Decimal("0.1"), "0.1"),
    Case("decimal", "NaN", Decimal("NaN"), "NaN"),
    Case("decimal", "Infinity", Decimal("Infinity"), "Infinity"),
    Case("decimal", -INF, Decimal("-Infinity"), "-Infinity"),
    Case("float", 0.1, 0.10000000149011612, "0.1"),
    Case("float", NAN, NAN, "NaN"),
    Case("float", "Infinity", INF, "Infinity"),
    Case("float", "-Infinity", -INF, "-Infinity"),
    Case("float", 3.4028234663852886e38, 3.4028234663852886e38),
    Case("double", 1e308, 1e308),
    Case("double", "NaN", NAN, "NaN"),
    Case("double", INF, INF, "Infinity"),
    Case("double", "-Infinity", -INF, "-Infinity"),
    Case("blob", b"\x00\xff\x00", b"\x00\xff\x00", "\\x00ff00"),
    Case("blob", base64.b64encode(b"\x00bin").decode(), b"\x00bin"),
    Case("blob", "", b""),
    Case("uuid", U1, uuid.UUID(U1)),
    Case("timeuuid", U2, uuid.UUID(U2)),
    Case("inet", "/10.0.0.1", IPv4Address("10.0.0.1"), "10.0.0.1"),
    Case("inet", "/0:0:0:0:0:0:0:1", IPv6Address("::1"), "::1"),
    Case("inet", "db.local/192.168.1.20", IPv4Address("192.168.1.20")),
    Case("timestamp", 0, datetime(1970, 1, 1, tzinfo=UTC), "1970-01-01 00:00:00+00"),
    Case("timestamp", -86_400_000, datetime(1969, 12, 31, tzinfo=UTC), "1969-12-31 00:00:00+00"),
    Case(
        "timestamp",
        -62_135_596_800_000,
        datetime(1, 1, 1, tzinfo=UTC),
        "0001-01-01 00:00:00+00",
    ),
    Case(
        "timestamp",
        253_402_300_799_999,
        datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
        "9999-12-31 23:59:59.999+00",
    ),
    Case("date", 19_782, date(2024, 2, 29), "2024-02-29"),
    Case("date", -719_162, date(1, 1, 1), "0001-01-01"),
    Case("date", 2_932_896, date(9999, 12, 31), "9999-12-31"),
    Case("time", 49_530_123_456_789, time(13, 45, 30, 123456), "13:45:30.123456"),
    Case("time", 86_399_999_999_999, time(23, 59, 59, 999999), "23:59:59.999999"),
    Case("duration", 33 * 86_400 * 10**9 + 500, timedelta(days=33), "33 days"),
    Case("duration", 3_723_000_001_000, timedelta(seconds=3723, microseconds=1), "01:02:03.000001"),
    Case("list<text>", ["a", "", "😀"], ["a", "", "😀"], '{a,"",😀}'),
    Case("set<int>", [1, 2, 3], [1, 2, 3]),
    Case("list<tinyint>", [-1], [-1]),
    Case("list<bigint>", [2**63 - 1], [2**63 - 1]),
    Case(
        "list<decimal>",
        ["1.10", "NaN", {"scale": 1, "value": twos(-5)}],
        [Decimal("1.10"), Decimal("NaN"), Decimal("-0.5")],
        "{1.10,NaN,-0.5}",
    ),
    Case("set<varint>", [2**100], [Decimal(2**100)]),
    Case("list<uuid>", [U1, U2], [uuid.UUID(U1), uuid.UUID(U2)]),
    Case("set<timeuuid>", [U2], [uuid.UUID(U2)]),
    Case("list<double>", [1.5, "NaN", "-Infinity"], [1.5, NAN, -INF], "{1.5,NaN,-Infinity}"),
    Case("list<float>", [0.5, NAN, "Infinity"], [0.5, NAN, INF], "{0.5,NaN,Infinity}"),
    Case("list<boolean>", [True, False], [True, False]),
    Case("list<blob>", [b"\x01", ""], [b"\x01", b""]),
    Case("set<inet>", ["/10.0.0.1", "/::1"], [IPv4Address("10.0.0.1"), IPv6Address("::1")]),
    Case(
        "list<timestamp>",
        [-62_135_596_800_000, 0],
        [datetime(1, 1, 1, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC)],
        '{"0001-01-01 00:00:00+00","1970-01-01 00:00:00+00"}',
    ),
    Case("list<date>", [2_932_896, -719_162], [date(9999, 12, 31), date(1, 1, 1)]),
    Case("list<time>", [1_000], [time(0, 0, 0, 1)]),
    Case("list<duration>", [86_400 * 10**9], [timedelta(days=1)]),
    Case("frozen<list<ascii>>", ["x"], ["x"]),
    Case("map<text, int>", {"b": 2, "a": 1}, {"a": 1, "b": 2}),
    Case("map<int, text>", [[1, "one"], [2, "😀"]], {"1": "one", "2": "😀"}),
    Case("map<bigint, boolean>", [{"key": 5, "value": True}], {"5": True}),
    Case(
        "map<uuid, frozen<map<timestamp, frozen<list<decimal>>>>>",
        {U1: [[0, ["12345678901234567890.123456789012345678", "NaN"]]]},
        {
            U1: {
                "1970-01-01T00:00:00.000Z": [
                    Decimal("12345678901234567890.123456789012345678"),
                    "NaN",
                ]
            }
        },
    ),
    Case(
        "map<text, double>",
        {"nan": "NaN", "inf": INF, "x": 0.25},
        {"nan": "NaN", "inf": "Infinity", "x": Decimal("0.25")},
    ),
    Case(
        "frozen<tuple<int, text, blob, inet, time, duration, float>>",
        {
            "field1": 1,
            "field2": None,
            "field3": b"\xff",
            "field4": "/::1",
            "field5": 49_530_123_456_789,
            "field6": -500,
            "field7": 0.10000000149011612,
        },
        [1, None, "/w==", "::1", "13:45:30.123456789", "PT-0.0000005S", Decimal("0.1")],
    ),
    Case(
        "frozen<person>",
        {
            "name": "Ann",
            "homes": [{"street": "Main 1", "zip": 2**70, "geo": {"field1": 1.5, "field2": "NaN"}}],
        },
        {
            "name": "Ann",
            "homes": [{"street": "Main 1", "zip": 2**70, "geo": [Decimal("1.5"), "NaN"]}],
        },
    ),
    Case("list<frozen<list<int>>>", [[1], [], [2, 3]], [[1], [], [2, 3]]),
    Case("set<frozen<tuple<int, date>>>", [[1, -1]], [[1, "1969-12-31"]]),
    Case(
        "list<frozen<address>>",
        [{"street": "漢字"}],
        [{"street": "漢字", "zip": None, "geo": None}],
    ),
]


def same(actual: Any, expected: Any) -> bool:
    """Equality where NaN equals NaN and Decimals must also agree on their digits and scale."""
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    if isinstance(expected, Decimal):
        return isinstance(actual, Decimal) and str(actual) == str(expected)
    if expected is None:
        return actual is None
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(map(same, actual, expected))
        )
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and actual.keys() == expected.keys()
            and all(same(actual[k], v) for k, v in expected.items())
        )
    return isinstance(actual, type(expected)) and actual == expected  # asyncpg subclasses UUID


async def connect(stack: Endpoints, *, tuple_codecs: bool = True) -> Any:
    """A connection set up as the sink's writer sets up its own."""
    conn = await asyncpg.connect(stack.postgres_dsn)
    await conn.execute("SET TIME ZONE 'UTC'")
    if tuple_codecs:
        for name, (encoder, decoder) in PG_TUPLE_CODECS.items():
            await conn.set_type_codec(
                name, schema="pg_catalog", encoder=encoder, decoder=decoder, format="tuple"
            )
    return conn


@pytest.fixture
async def scratch(stack: Endpoints, unique: Unique) -> AsyncIterator[tuple[Any, str]]:
    """A connection and an empty schema of its own (dropped after the test)."""
    conn = await connect(stack)
    schema = unique.schema("types")
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield conn, schema
    finally:
        await conn.close()


async def write_and_read(conn: Any, schema: str, cql: str, value: Any) -> tuple[Any, str]:
    """Write one converted value with binary COPY; return it as SELECTed and as text."""
    t = parse_cql_type(cql, UDTS)
    await conn.execute(f'CREATE TABLE "{schema}".t (id int PRIMARY KEY, c {pg_type(t)})')
    await conn.copy_records_to_table(
        "t", schema_name=schema, records=[(1, to_pg(t, value))], columns=["id", "c"]
    )
    query = f"""SELECT c, format('%s', c) AS text FROM "{schema}".t WHERE id = 1"""
    row = await conn.fetchrow(query)
    return row["c"], row["text"]


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_value_round_trips_through_postgres(scratch: tuple[Any, str], case: Case) -> None:
    """The converted value is stored by binary COPY and reads back as the expected value."""
    conn, schema = scratch
    stored, text = await write_and_read(conn, schema, case.cql, case.value)
    if pg_type(parse_cql_type(case.cql, UDTS)) == "jsonb":
        stored = json.loads(stored, parse_float=Decimal)
    assert same(stored, case.expected), (stored, case.expected)
    if case.text is not None:
        assert text == case.text


async def test_every_scalar_type_in_one_row(scratch: tuple[Any, str]) -> None:
    """One COPY writes a column per scalar type plus an array of it (with a NULL element)."""
    conn, schema = scratch
    first: dict[str, Case] = {}
    for case in CASES:
        if "<" not in case.cql:
            first.setdefault(case.cql, case)
    types = {name: (parse_cql_type(name), parse_cql_type(f"list<{name}>")) for name in first}
    ddl = ", ".join(f"c_{n} {pg_type(t)}, a_{n} {pg_type(a)}" for n, (t, a) in types.items())
    await conn.execute(f'CREATE TABLE "{schema}".wide (id int PRIMARY KEY, {ddl})')
    record: list[Any] = [1]
    for name, (t, array) in types.items():
        record += [to_pg(t, first[name].value), to_pg(array, [first[name].value, None])]
    columns = ["id", *(f"{p}_{name}" for name in types for p in "ca")]
    await conn.copy_records_to_table(
        "wide", schema_name=schema, records=[tuple(record)], columns=columns
    )
    row = await conn.fetchrow(f'SELECT * FROM "{schema}".wide')
    for name, case in first.items():
        assert same(row[f"c_{name}"], case.expected), (name, row[f"c_{name}"])
        assert same(row[f"a_{name}"], [case.expected, None]), (name, row[f"a_{name}"])


async def test_without_tuple_codecs_asyncpg_stores_edge_dates_as_infinity(
    stack: Endpoints, unique: Unique
) -> None:
    """Why PG_TUPLE_CODECS exists: asyncpg's own codecs turn these edge values into ±infinity."""
    conn = await connect(stack, tuple_codecs=False)
    schema = unique.schema("types")
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        await conn.execute(f'CREATE TABLE "{schema}".t (id int, d date, ts timestamptz)')
        records = [
            (1, to_pg(parse_cql_type("date"), 2_932_896), None),
            (2, None, to_pg(parse_cql_type("timestamp"), -62_135_596_800_000)),
        ]
        await conn.copy_records_to_table("t", schema_name=schema, records=records)
        rows = await conn.fetch(f'SELECT d::text, ts::text FROM "{schema}".t ORDER BY id')
        assert [tuple(r) for r in rows] == [("infinity", None), (None, "-infinity")]
    finally:
        await conn.close()
