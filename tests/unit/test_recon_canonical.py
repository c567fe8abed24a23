"""canonical.py: equal data in either side's representation has one canonical form; any real
difference changes it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import uuid
from collections import namedtuple
from decimal import Decimal
from typing import Any

import pytest
from cassandra.util import Date, Duration, OrderedMapSerializedKey, SortedSet, Time

from cdc_recon.canonical import (
    UNCONVERTIBLE,
    bucket_of,
    driver_exact,
    for_cassandra,
    for_postgres,
    key_text,
    row_digest,
)
from cdc_sink.model.cql import CqlType, parse_cql_type

UDTS = {"address": [("street", "text"), ("zip", "varint"), ("at", "timestamp")]}
Address = namedtuple("Address", ["street", "zip", "at"])


def t(text: str) -> CqlType:
    return parse_cql_type(text, UDTS)


@pytest.mark.parametrize(
    ("cql", "cassandra", "postgres"),
    [
        ("decimal", Decimal("1.50"), Decimal("1.5")),
        ("decimal", Decimal("0E-8"), Decimal("0")),
        ("decimal", Decimal("1E+7"), Decimal("10000000")),
        ("varint", 10**40, Decimal(10**40)),
        ("float", float("nan"), float("nan")),
        ("double", float("-inf"), float("-inf")),
        (
            "timestamp",
            dt.datetime(1969, 7, 20, 20, 17),
            dt.datetime(1969, 7, 20, 20, 17, tzinfo=dt.UTC),
        ),
        ("date", Date(-1), dt.date(1969, 12, 31)),
        ("time", Time(49_530_123_456_789), dt.time(13, 45, 30, 123456)),
        ("duration", Duration(1, 2, 3_000), dt.timedelta(days=32, microseconds=3)),
        ("inet", "10.0.0.1", ipaddress.ip_interface("10.0.0.1/32")),
        ("blob", b"\x00\xff", b"\x00\xff"),
        ("timeuuid", uuid.UUID(int=1), uuid.UUID(int=1)),
        ("set<int>", SortedSet([3, 1, 2]), [2, 3, 1]),
        ("list<timestamp>", [dt.datetime(1900, 1, 1)], [dt.datetime(1900, 1, 1, tzinfo=dt.UTC)]),
        ("map<int, text>", OrderedMapSerializedKey(None, 0), None),
        ("set<text>", None, []),
        ("frozen<list<int>>", [], []),
        (
            "map<int, decimal>",
            {2: Decimal("1.0"), 10: Decimal("5E+1")},
            '{"10": 50, "2": 1.00}',
        ),
        (
            "frozen<address>",
            Address("x", 12, dt.datetime(1950, 1, 1)),
            '{"at": "1950-01-01T00:00:00.000Z", "zip": 12, "street": "x"}',
        ),
        ("tuple<double, text>", (1e308, "a"), "[1" + "0" * 308 + ', "a"]'),
        ("frozen<set<frozen<list<int>>>>", SortedSet([(2,), (1,)]), "[[2], [1]]"),
    ],
)
def test_equal_values_have_one_canonical_form(cql: str, cassandra: Any, postgres: Any) -> None:
    """The driver's value and PostgreSQL's value of the same data canonicalise alike."""
    assert for_cassandra(t(cql))(cassandra) == for_postgres(t(cql))(postgres)


@pytest.mark.parametrize(
    ("cql", "cassandra", "postgres"),
    [
        ("decimal", Decimal("1.5"), Decimal("1.51")),
        (
            "map<text, decimal>",
            {"a": Decimal("12345678901234567890.123456789")},
            '{"a": 12345678901234567890.1234567890000001}',
        ),
        ("float", 0.0, float("nan")),
        ("text", "", None),
        ("list<int>", [1, 2], [2, 1]),
        ("frozen<list<int>>", [], None),
        ("map<text, int>", {"a": 1}, '{"a": 2}'),
        ("frozen<address>", Address("x", 1, None), '{"street": "x", "zip": 1, "at": null, "y": 1}'),
        (
            "frozen<address>",
            Address("x", 1, None),
            '{"street": "x", "zip": 1, "at": {"field1": 1.5}}',  # a shape the type does not explain
        ),
        (
            "timestamp",
            dt.datetime(2000, 1, 1),
            dt.datetime(2000, 1, 1, 0, 0, 0, 1000, tzinfo=dt.UTC),
        ),
    ],
)
def test_different_values_stay_different(cql: str, cassandra: Any, postgres: Any) -> None:
    """A real difference (including an extra UDT field or list order) is never normalised away."""
    assert for_cassandra(t(cql))(cassandra) != for_postgres(t(cql))(postgres)


def test_driver_float_rounding_of_old_timestamps_is_undone() -> None:
    """The driver's microsecond error far from 1970 is rounded back to Cassandra's millisecond,
    inside collections and UDTs too."""
    off = dt.datetime(404, 3, 1, 12, 0, 0, 7)  # the driver's reading of 12:00:00.000
    assert driver_exact(t("timestamp"), off) == dt.datetime(404, 3, 1, 12)
    assert driver_exact(t("list<timestamp>"), [off]) == [dt.datetime(404, 3, 1, 12)]
    fixed = driver_exact(t("frozen<address>"), Address("s", 1, off))
    assert fixed == {"street": "s", "zip": 1, "at": dt.datetime(404, 3, 1, 12)}
    assert driver_exact(t("text"), "x") == "x"


def test_a_value_the_sink_cannot_store_is_a_difference() -> None:
    """A Cassandra value the sink's converter refuses never equals any PostgreSQL value."""
    canon = for_cassandra(t("text"))("nul\x00")
    assert isinstance(canon, str)
    assert canon.startswith(UNCONVERTIBLE)


def test_varints_longer_than_python_parses_compare_in_jsonb() -> None:
    """A varint of 5,000 digits in a map (jsonb: PostgreSQL keeps every digit, Python parses
    no int past 4,300) has the same canonical form on both sides; past numeric's 131072
    digits, Cassandra's value is a difference, found without converting it."""
    cql, digits = t("map<text, varint>"), "7" * 5_000
    postgres = '{"a": ' + digits + ', "b": 5}'
    cassandra = {"a": int(Decimal(digits)), "b": 5}
    assert for_postgres(cql)(postgres) == for_cassandra(cql)(cassandra)
    assert for_cassandra(cql)({"a": 1 << 8_000_000}).startswith(UNCONVERTIBLE)


def test_digests_and_buckets() -> None:
    """Row digests change with any value; buckets are stable and in range."""
    row = ((1, "a"), ("x", None))
    assert row_digest(row) == row_digest(((1, "a"), ("x", None)))
    assert row_digest(row) != row_digest(((1, "a"), ("x", "")))
    assert row_digest(row) != row_digest(((1, "b"), ("x", None)))
    text = key_text([1, "a"])
    assert json.loads(text) == [1, "a"]
    assert bucket_of(text, 64) == bucket_of(text, 64)
    assert {bucket_of(key_text([i]), 8) for i in range(200)} == set(range(8))
