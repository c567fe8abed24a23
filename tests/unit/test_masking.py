"""PII masking rules: parsing, checking against a table, each method, and edge values."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import ipaddress
import json
import math
import traceback
import uuid
from collections import namedtuple
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from cdc_recon.canonical import UNCONVERTIBLE, for_converted, for_postgres
from cdc_sink.config import ConfigError, MaskingConfig, Secret, load_config
from cdc_sink.errors import ConversionError
from cdc_sink.model.cql import CqlType, parse_cql_type
from cdc_sink.model.events import Cell, ChangeEvent, Op, Position
from cdc_sink.model.masking import (
    ColumnMask,
    MaskingError,
    MaskingPolicy,
    MaskRule,
    hash_text,
    masking_policy,
    parse_rules,
    partial_text,
)
from cdc_sink.model.scalars import text_rendering
from cdc_sink.model.values import unguarded_converter
from cdc_sink.schema.tables import TableSchema

KEY = b"k" * 32
COLUMNS = {
    "id": parse_cql_type("int"),
    "email": parse_cql_type("text"),
    "name": parse_cql_type("varchar"),
    "tags": parse_cql_type("set<text>"),
    "notes": parse_cql_type("list<text>"),
    "prefs": parse_cql_type("map<text, text>"),
    "age": parse_cql_type("int"),
}
RULES = (
    "shop.users.email=hash; shop.users.name=partial:first:2\n"
    "shop.users.tags=redact  # each element\n"
    "shop.users.notes=partial:last:3; shop.users.prefs=null"
)


def schema(rules: str = RULES, marker: str = "***") -> TableSchema:
    policy = MaskingPolicy(parse_rules(rules), KEY, marker)
    plain = TableSchema("shop", "users", "cdc_users", ("id",), COLUMNS)
    return plain.with_masks(policy.masks("shop", "users", COLUMNS, ("id",)))


def event(**cells: Any) -> ChangeEvent:
    return ChangeEvent(
        keyspace="shop",
        table="users",
        op=Op.INSERT,
        key={"id": 1},
        cells={n: Cell(v, None) for n, v in cells.items()},
        ts_us=1,
        snapshot=False,
        position=Position("t", 0, 0),
    )


def test_rules_parse_from_entries_separated_by_semicolons_and_lines() -> None:
    """Every entry becomes a rule; comments and blank entries are skipped."""
    rules = parse_rules(RULES + ";;\n# a comment\n")
    assert [r.text for r in rules] == [
        "shop.users.email=hash",
        "shop.users.name=partial:first:2",
        "shop.users.tags=redact",
        "shop.users.notes=partial:last:3",
        "shop.users.prefs=null",
    ]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("users.email=hash", "'users.email=hash' is not `keyspace.table.column=method`"),
        ("shop.users.email", "'shop.users.email' is not `keyspace.table.column=method`"),
        ("shop.users.email=scramble", "'shop.users.email=scramble': unknown method 'scramble'"),
        ("shop.users.email=partial:middle:2", "unknown method 'partial:middle:2'"),
        ("shop.users.email=hash;shop.users.email=null", "shop.users.email has a rule already"),
    ],
)
def test_malformed_rules_are_refused_naming_the_rule(text: str, says: str) -> None:
    """A rule that cannot be read is a configuration error quoting it."""
    with pytest.raises(MaskingError, match=None) as caught:
        parse_rules(text)
    assert says in str(caught.value)
    assert isinstance(caught.value, ConfigError)


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ("shop.users.mail=hash", "'shop.users.mail=hash': shop.users has no column 'mail'"),
        ("shop.users.id=redact", "'shop.users.id=redact': 'id' is part of the primary key"),
        ("shop.users.prefs=hash", "'shop.users.prefs=hash': hash fits scalar columns"),
        ("shop.users.age=redact", "redact fits text, ascii and varchar columns"),
        ("shop.users.prefs=partial:last:2", "partial fits text, ascii and varchar"),
    ],
)
def test_rules_that_do_not_fit_the_table_are_refused_naming_the_rule(rule: str, says: str) -> None:
    """An unknown column, a key column, or a method the type cannot take: a clear error."""
    with pytest.raises(MaskingError) as caught:
        MaskingPolicy(parse_rules(rule), KEY).masks("shop", "users", COLUMNS, ("id",))
    assert says in str(caught.value)


def test_rules_of_other_tables_are_left_out() -> None:
    """A table gets only its own rules; another keyspace's table of the same name none."""
    rules = parse_rules("shop.users.email=hash; other.users.nope=null; shop.orders.x=null")
    masks = MaskingPolicy(rules, KEY).masks("shop", "users", COLUMNS, ("id",))
    assert list(masks) == ["email"]


def test_a_hash_rule_without_a_key_stops_the_start() -> None:
    """`hash` needs CDC_MASKING__HASH_KEY (or the Vault secret): refused at start-up."""
    with pytest.raises(MaskingError, match=r"'shop\.users\.email=hash' needs a hash key"):
        masking_policy(MaskingConfig(rules="shop.users.email=hash"))
    assert masking_policy(MaskingConfig(rules="shop.users.email=redact")).rules


def test_settings_come_from_the_environment_and_keep_the_key_secret() -> None:
    """CDC_MASKING__* fill the section; the key is a Secret, never shown; a short key or an
    empty marker is refused."""
    config = load_config(
        {
            "CDC_MASKING__RULES": "shop.users.email=hash",
            "CDC_MASKING__HASH_KEY": "s" * 32,
            "CDC_MASKING__MARKER": "[gone]",
        }
    )
    assert config.masking.hash_key == Secret("s" * 32)
    assert "s" * 32 not in repr(config)
    assert "s" * 32 not in repr(masking_policy(config.masking))
    assert masking_policy(config.masking).marker == "[gone]"
    with pytest.raises(ConfigError, match="CDC_MASKING__HASH_KEY must be at least 32 bytes"):
        load_config({"CDC_MASKING__HASH_KEY": "short"})
    with pytest.raises(ConfigError, match="CDC_MASKING__MARKER must be 1 to 64 characters"):
        load_config({"CDC_MASKING__MARKER": ""})


def test_hash_is_a_keyed_deterministic_hmac_sha256() -> None:
    """Equal values hash alike (joins still work), other keys differently, as 64 hex digits."""
    expected = hmac.new(KEY, b"ada@example.com", hashlib.sha256).hexdigest()
    assert hash_text(KEY, "ada@example.com") == expected
    assert hash_text(KEY, "ada@example.com") != hash_text(b"x" * 32, "ada@example.com")
    assert hash_text(KEY, "") == hmac.new(KEY, b"", hashlib.sha256).hexdigest()
    assert len(hash_text(KEY, "é🙂")) == 64


@pytest.mark.parametrize(
    ("value", "keep", "from_end", "masked"),
    [
        ("ada@example.com", 12, True, "***@example.com"),
        ("ada@example.com", 3, False, "ada***"),
        ("abc", 3, False, "***"),  # keeping all of it would show it whole
        ("ab", 3, True, "***"),
        ("", 2, False, "***"),
        ("x", 0, False, "***"),
        ("żółć-ünï🙂😀", 2, True, "***🙂😀"),  # characters, not bytes: no broken code point
        ("日本語テキスト", 2, False, "日本***"),
    ],
)
def test_partial_keeps_characters_and_never_the_whole_value(
    value: str, keep: int, from_end: bool, masked: str
) -> None:
    """The first/last N characters with the marker for the rest; short values: marker only."""
    assert partial_text(value, keep, from_end, "***") == masked


def test_every_method_masks_through_the_tables_converters() -> None:
    """The TableSchema's converters (and the per-record path, to_mutation) write only masked
    values: hash, partial, per-element redact/partial of sets and lists, null; None stays
    None; unmasked columns are untouched."""
    table = schema()
    mutation = table.to_mutation(
        event(
            email="ada@example.com",
            name="Ada Lovelace",
            tags=["vip", "beta"],
            notes=["call me", None, ""],
            prefs={"lang": "en"},
            age=36,
        )
    )
    assert mutation.values == {
        "email": hash_text(KEY, "ada@example.com"),
        "name": "Ad***",
        "tags": ["***", "***"],
        "notes": ["*** me", None, "***"],
        "prefs": None,
        "age": 36,
    }
    assert table.converters["email"](None) is None
    assert table.unguarded["prefs"]("anything, not even a map") is None


def test_a_masked_value_that_does_not_fit_is_reported_with_the_marker() -> None:
    """A conversion error on a masked column names the column and the problem, shows the
    marker, and carries no chained error that would show the value."""
    table = schema(marker="[masked]")
    # NUL: PostgreSQL cannot store it. Upper case: the traceback's source lines are lower case.
    secret = "\x00" + "private@example.com".upper()
    with pytest.raises(ConversionError) as caught:
        table.to_mutation(event(email=secret))
    shown = "".join(traceback.format_exception(caught.value))
    assert "column 'email'" in str(caught.value)
    assert "[masked]" in str(caught.value)
    assert str(caught.value).endswith(
        "text: PostgreSQL cannot store the NUL character (U+0000): [masked]"
    )
    assert "PRIVATE" not in shown
    with pytest.raises(ConversionError) as in_set:
        table.to_mutation(event(tags=["fine", secret]))
    assert "PRIVATE" not in "".join(traceback.format_exception(in_set.value))
    unmasked = TableSchema("shop", "users", "cdc_users", ("id",), COLUMNS)
    with pytest.raises(ConversionError, match="PRIVATE"):  # unmasked columns show a preview
        unmasked.to_mutation(event(email=secret))


def test_rules_survive_new_columns() -> None:
    """A schema that grows keeps masking its masked columns."""
    grown = schema().with_columns({"extra": parse_cql_type("text")})
    assert grown.converters["email"]("a") == hash_text(KEY, "a")
    assert grown.converters["extra"]("a") == "a"


def test_rule_text_round_trips() -> None:
    """`MaskRule.text` is the rule as the settings write it."""
    rule = MaskRule("ks", "t", "c", "partial", 4, True)
    assert parse_rules(rule.text) == (rule,)


UDTS = {"address": [("street", "text"), ("city", "text"), ("lines", "list<text>"), ("zip", "int")]}
ADDRESSED = {
    "id": parse_cql_type("int"),
    "home": parse_cql_type("frozen<address>", UDTS),
    "work": parse_cql_type("address", UDTS),
    "note": parse_cql_type("text"),
}
Address = namedtuple("Address", ["street", "city", "lines", "zip"])


def addressed(rules: str) -> TableSchema:
    policy = MaskingPolicy(parse_rules(rules), KEY, "***")
    plain = TableSchema("shop", "places", "cdc_places", ("id",), ADDRESSED)
    return plain.with_masks(policy.masks("shop", "places", ADDRESSED, ("id",)))


def test_udt_fields_are_masked_one_by_one() -> None:
    """`column.field` rules mask those fields of a UDT (frozen or not) and keep the others;
    Debezium's struct and the Cassandra driver's named tuple come out alike."""
    table = addressed(
        "shop.places.home.street=hash; shop.places.home.city=partial:first:1; "
        "shop.places.home.lines=redact; shop.places.work.zip=null"
    )
    struct = {"street": "1 Main St", "city": "Zürich", "lines": ["c/o Ada", None], "zip": 8001}
    driver = Address("1 Main St", "Zürich", ["c/o Ada", None], 8001)
    expected = {
        "street": hash_text(KEY, "1 Main St"),
        "city": "Z***",
        "lines": ["***", None],
        "zip": 8001,
    }
    for value in (struct, driver):
        assert json.loads(table.converters["home"](value)) == expected
    assert json.loads(table.converters["work"](struct)) == {**struct, "zip": None}
    partial = {"city": None, "street": "only this"}  # fields left out or null stay so
    assert json.loads(table.converters["home"](partial)) == {
        "street": hash_text(KEY, "only this"),
        "city": None,
        "lines": None,
        "zip": None,
    }


def test_a_udt_with_a_masked_field_that_does_not_fit_shows_the_marker() -> None:
    """A bad UDT value (an unknown field, a wrong field type) is reported with the marker, not
    the value, once any field of the column is masked."""
    table = addressed("shop.places.home.street=redact")
    for bad in ({"street": "SECRET STREET", "planet": "x"}, {"city": 5, "street": "SECRET"}):
        with pytest.raises(ConversionError) as caught:
            table.to_mutation(event_of("places", home=bad))
        shown = "".join(traceback.format_exception(caught.value))
        assert "column 'home'" in shown
        assert "SECRET" not in shown


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ("shop.places.note.x=hash", "'note' is text, not a UDT with known fields"),
        (
            "shop.places.home.planet=hash",
            "frozen<address> has no field 'planet' (it has street, city",
        ),
        ("shop.places.home.zip=redact", "redact fits text, ascii and varchar columns and fields"),
        ("shop.places.home=null; shop.places.home.city=hash", "has a rule of its own and rules"),
        ("shop.places.home.city=hash; shop.places.home=null", "has a rule of its own and rules"),
        ("shop.places.id.x=null", "'id' is part of the primary key"),
        ("shop.places.nope.x=null", "shop.places has no column 'nope'"),
    ],
)
def test_udt_field_rules_that_do_not_fit_are_refused_naming_the_rule(rule: str, says: str) -> None:
    """A field rule on a column that is no UDT, an unknown field, a method the field's type
    cannot take, or rules of both a column and its fields: a clear error quoting the rule."""
    with pytest.raises(MaskingError) as caught:
        MaskingPolicy(parse_rules(rule), KEY).masks("shop", "places", ADDRESSED, ("id",))
    assert says in str(caught.value)
    assert rule.split(";")[-1].strip() in str(caught.value)


def masked_canon(t: CqlType, mask: ColumnMask) -> Callable[[Any], Any]:
    """The canonical form of a driver value of a column `mask` masks, through the converter
    the sink's TableSchema makes for it."""
    return for_converted(t, mask.guarded(t, unguarded_converter(t)), mask.stored_type or t)


def test_reconciliation_masks_cassandra_values_as_the_sink_stores_them() -> None:
    """The canonical form of a driver value of a masked column equals that of what the sink
    writes for the Debezium value (so masked tables reconcile), and never holds the value."""
    rules = parse_rules("shop.places.home.street=hash; shop.places.note=partial:last:2")
    masks = MaskingPolicy(rules, KEY).masks("shop", "places", ADDRESSED, ("id",))
    table = addressed("shop.places.home.street=hash; shop.places.note=partial:last:2")
    struct = {"street": "1 Main St", "city": "Bern", "lines": ["a"], "zip": 3000}
    driver = Address("1 Main St", "Bern", ["a"], 3000)
    for column, cassandra_value, debezium_value in (
        ("home", driver, struct),
        ("note", "private note", "private note"),
    ):
        t = ADDRESSED[column]
        stored = for_postgres(t)(table.converters[column](debezium_value))
        assert masked_canon(t, masks[column])(cassandra_value) == stored
    bad = masked_canon(ADDRESSED["note"], masks["note"])("SECRET\x00")
    assert bad.startswith(UNCONVERTIBLE)
    assert "SECRET" not in bad


def event_of(table: str, **cells: Any) -> ChangeEvent:
    return replace(event(), table=table, cells={n: Cell(v, None) for n, v in cells.items()})


# --- hash of columns that are not text ---------------------------------------------------------

DRIVER_TIME = namedtuple("DRIVER_TIME", ["nanosecond_time"])
DRIVER_DATE = namedtuple("DRIVER_DATE", ["days_from_epoch"])


@pytest.mark.parametrize(
    ("cql", "values", "text"),
    [
        ("boolean", [True], "true"),
        ("boolean", [False], "false"),
        ("tinyint", [-128], "-128"),
        ("int", [-42], "-42"),
        ("bigint", [-(2**63)], "-9223372036854775808"),
        ("counter", [7], "7"),
        ("varint", [10**40, str(10**40), (10**40).to_bytes(17, "big")], "1" + "0" * 40),
        ("varint", [-(10**30)], "-1" + "0" * 30),
        # decimals: one number, one text, whatever scale or notation carries it
        ("decimal", ["1.50", "1.5", {"scale": 2, "value": b"\x00\x96"}, Decimal("15E-1")], "1.5"),
        ("decimal", ["1E+3", "1000.000", {"scale": -3, "value": b"\x01"}], "1000"),
        ("decimal", ["-0.00", "0", "0E+5"], "0"),
        ("decimal", ["-12.340"], "-12.34"),
        ("decimal", ["0.000001"], "0.000001"),
        # floats: the shortest decimal that reads back as the value; -0.0 is 0.0
        ("double", [0.1], "0.1"),
        ("double", [-0.0, 0.0, 0], "0.0"),
        ("double", [1e16], "1e+16"),
        ("double", ["NaN", math.nan], "NaN"),
        ("double", ["Infinity", math.inf], "Infinity"),
        ("double", ["-Infinity", -math.inf], "-Infinity"),
        ("float", [0.1, 0.10000000149011612], "0.1"),
        ("float", [-0.0], "0.0"),
        ("float", ["NaN"], "NaN"),
        ("blob", [b"\x00\xab", "AKs="], "0x00ab"),
        ("blob", [b""], "0x"),
        (
            "uuid",
            [
                "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
                uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            ],
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ),
        (
            "timeuuid",
            ["D2177DD0-EAA2-11DE-A572-001B779C76E3"],
            "d2177dd0-eaa2-11de-a572-001b779c76e3",
        ),
        ("inet", ["/192.0.2.1", "host/192.0.2.1", ipaddress.ip_address("192.0.2.1")], "192.0.2.1"),
        (
            "inet",
            ["/2001:DB8:0:0:0:0:0:1", bytes(ipaddress.ip_address("2001:db8::1").packed)],
            "2001:db8::1",
        ),
        ("inet", ["/::ffff:192.0.2.1"], "::ffff:192.0.2.1"),
        # timestamps: the UTC instant, milliseconds always (microseconds where there are any)
        (
            "timestamp",
            [
                1_700_000_000_123,
                "2023-11-14T22:13:20.123Z",
                "2023-11-15T00:13:20.123+02:00",
                dt.datetime(2023, 11, 14, 22, 13, 20, 123000),  # the driver's naive UTC
            ],
            "2023-11-14T22:13:20.123Z",
        ),
        ("timestamp", [0], "1970-01-01T00:00:00.000Z"),
        ("timestamp", [-62_135_596_800_000], "0001-01-01T00:00:00.000Z"),
        ("timestamp", ["2024-01-02T03:04:05.000001Z"], "2024-01-02T03:04:05.000001Z"),
        ("date", [19_000, "2022-01-08", DRIVER_DATE(19_000)], "2022-01-08"),
        # time: Cassandra's nanoseconds, all nine digits
        (
            "time",
            [49_530_123_456_789, "13:45:30.123456789", DRIVER_TIME(49_530_123_456_789)],
            "13:45:30.123456789",
        ),
        ("time", [0], "00:00:00.000000000"),
        ("duration", [90_061_000_000_001], "P1DT1H1M1.000000001S"),
        ("duration", [-3_600_000_000_000], "PT-1H"),
        ("text", ["ü🙂"], "ü🙂"),
    ],
)
def test_each_scalar_type_has_one_canonical_text(cql: str, values: list[Any], text: str) -> None:
    """Every shape a value of the type arrives in (Debezium's JSON and Avro, the Cassandra
    driver's) renders as the same documented text, and a hashed column holds its digest."""
    t = parse_cql_type(cql)
    render = text_rendering(t)
    assert render is not None
    hashed = MaskingPolicy(parse_rules("shop.users.v=hash"), KEY).masks(
        "shop", "users", {"id": COLUMNS["id"], "v": t}, ("id",)
    )["v"]
    for value in values:
        assert render(value) == text, value
        assert hashed.guarded(t, unguarded_converter(t))(value) == hash_text(KEY, text)


def test_hash_of_text_columns_keeps_the_digest_of_the_text() -> None:
    """A text column's digest is still that of its UTF-8 text, so data hashed before stays
    valid; its PostgreSQL type stays text."""
    table = schema()
    assert (
        table.converters["email"]("ada@example.com")
        == hmac.new(KEY, b"ada@example.com", hashlib.sha256).hexdigest()
    )
    assert table.column_type("email") == "text"


HASHED_COLUMNS = {
    "id": parse_cql_type("int"),
    "n": parse_cql_type("bigint"),
    "u": parse_cql_type("uuid"),
    "at": parse_cql_type("timestamp"),
    "price": parse_cql_type("decimal"),
    "codes": parse_cql_type("set<int>"),
    "seen": parse_cql_type("frozen<list<timestamp>>"),
    "home": parse_cql_type("frozen<address>", UDTS),
    "plain": parse_cql_type("bigint"),
}


def hashed_table(rules: str) -> TableSchema:
    policy = MaskingPolicy(parse_rules(rules), KEY)
    plain = TableSchema("shop", "hashed", "cdc_hashed", ("id",), HASHED_COLUMNS)
    return plain.with_masks(policy.masks("shop", "hashed", HASHED_COLUMNS, ("id",)))


HASH_ALL = (
    "shop.hashed.n=hash; shop.hashed.u=hash; shop.hashed.at=hash; shop.hashed.price=hash; "
    "shop.hashed.codes=hash; shop.hashed.seen=hash; shop.hashed.home.zip=hash"
)


def test_hashed_columns_that_are_not_text_become_text_columns() -> None:
    """The DDL makes a hashed scalar column text, a hashed list or set text[], and leaves a
    UDT jsonb (its hashed field becomes a JSON string); unmasked columns keep their types."""
    table = hashed_table(HASH_ALL)
    assert {n: table.column_type(n) for n in HASHED_COLUMNS} == {
        "id": "integer",
        "n": "text",
        "u": "text",
        "at": "text",
        "price": "text",
        "codes": "text[]",
        "seen": "text[]",
        "home": "jsonb",
        "plain": "bigint",
    }
    create = table.create_sql("public")
    assert '"n" text,' in create
    assert '"codes" text[],' in create
    assert '"plain" bigint,' in create
    assert table.add_column_sql("public", "at").endswith('"at" text')
    mutation = table.to_mutation(
        replace(
            event(),
            table="hashed",
            cells={
                n: Cell(v, None)
                for n, v in {
                    "n": 12345,
                    "u": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                    "at": 1_700_000_000_000,
                    "price": {"scale": 2, "value": b"\x04\xd2"},
                    "codes": [3, None, 1],
                    "seen": [0],
                    "home": {"street": "s", "city": None, "lines": None, "zip": 8001},
                    "plain": 5,
                }.items()
            },
        )
    )
    h = functools.partial(hash_text, KEY)
    assert mutation.values == {
        "n": h("12345"),
        "u": h("1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
        "at": h("2023-11-14T22:13:20.000Z"),
        "price": h("12.34"),
        "codes": [h("3"), None, h("1")],
        "seen": [h("1970-01-01T00:00:00.000Z")],
        "home": json.dumps(
            {"street": "s", "city": None, "lines": None, "zip": h("8001")}, separators=(",", ":")
        ),
        "plain": 5,
    }
    assert json.loads(mutation.values["home"])["zip"] == h("8001")


def test_a_hashed_value_that_does_not_fit_is_reported_with_the_marker() -> None:
    """A value the column's type refuses is a ConversionError showing the marker, never the
    value, as for text columns."""
    table = hashed_table(HASH_ALL)
    for column, bad in (("n", 2**70), ("u", "SECRET-not-a-uuid"), ("home", {"zip": "SECRET"})):
        with pytest.raises(ConversionError) as caught:
            table.to_mutation(replace(event(), table="hashed", cells={column: Cell(bad, None)}))
        shown = "".join(traceback.format_exception(caught.value))
        assert f"column {column!r}" in shown
        assert "***" in shown
        assert "SECRET" not in shown
        assert "1180591620717411303424" not in shown


def test_hash_fits_scalars_and_their_lists_and_sets_only() -> None:
    """hash of a map, a tuple, a UDT as a whole or a list of UDTs is refused naming the rule
    (null fits those); redact and partial still fit text alone."""
    columns = {
        "id": parse_cql_type("int"),
        "m": parse_cql_type("map<text, int>"),
        "t": parse_cql_type("frozen<tuple<int, text>>"),
        "a": parse_cql_type("frozen<address>", UDTS),
        "l": parse_cql_type("list<frozen<list<int>>>"),
        "n": parse_cql_type("bigint"),
    }
    for column in ("m", "t", "a", "l"):
        with pytest.raises(MaskingError, match=f"shop.t.{column}=hash': hash fits scalar"):
            MaskingPolicy(parse_rules(f"shop.t.{column}=hash"), KEY).masks(
                "shop", "t", columns, ("id",)
            )
    for method in ("redact", "partial:first:1"):
        with pytest.raises(MaskingError, match="use hash or null"):
            MaskingPolicy(parse_rules(f"shop.t.n={method}"), KEY).masks(
                "shop", "t", columns, ("id",)
            )
    with pytest.raises(MaskingError, match="part of the primary key"):
        MaskingPolicy(parse_rules("shop.t.id=hash"), KEY).masks("shop", "t", columns, ("id",))


def test_a_column_left_text_by_a_removed_rule_is_written_as_its_canonical_text() -> None:
    """With no rule left, a column PostgreSQL holds as text (`rendered`) gets each value's
    canonical text in the clear, and its type stays text; refused values say why."""
    table = hashed_table("").with_masks({}, {"n", "codes"})
    assert table.column_type("n") == "text"
    assert table.column_type("codes") == "text[]"
    assert table.converters["n"](12345) == "12345"
    assert table.converters["codes"]([2, None]) == ["2", None]
    assert table.unguarded["n"](-1) == "-1"
    with pytest.raises(ConversionError, match="64-bit"):
        table.converters["n"](2**70)


def test_reconciliation_hashes_cassandra_values_of_every_type_as_the_sink_does() -> None:
    """The canonical form of a driver value of a hashed column that is not text equals that
    of the text the sink stored for Debezium's value, so the table reconciles."""
    table = hashed_table(HASH_ALL)
    driver_and_debezium = {
        "n": (12345, 12345),
        "u": (
            uuid.UUID("1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
            "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        ),
        "at": (dt.datetime(2023, 11, 14, 22, 13, 20, 123000), 1_700_000_000_123),
        "price": (Decimal("12.340"), {"scale": 2, "value": b"\x04\xd2"}),
        "codes": (frozenset({1, 3}), [1, 3]),
        "home": (
            Address("s", None, None, 8001),
            {"street": "s", "city": None, "lines": None, "zip": 8001},
        ),
    }
    for column, (driver, debezium) in driver_and_debezium.items():
        t, mask = HASHED_COLUMNS[column], table.masks[column]
        stored = for_postgres(table.stored_types[column])(table.converters[column](debezium))
        assert masked_canon(t, mask)(driver) == stored, column
