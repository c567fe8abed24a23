"""PII masking rules: parsing, checking against a table, each method, and edge values."""

from __future__ import annotations

import hashlib
import hmac
import json
import traceback
from collections import namedtuple
from dataclasses import replace
from typing import Any

import pytest

from cdc_recon.canonical import UNCONVERTIBLE, for_masked, for_postgres
from cdc_sink.config import ConfigError, MaskingConfig, Secret, load_config
from cdc_sink.errors import ConversionError
from cdc_sink.model.cql import parse_cql_type
from cdc_sink.model.events import Cell, ChangeEvent, Op, Position
from cdc_sink.model.masking import (
    MaskingError,
    MaskingPolicy,
    MaskRule,
    column_masks,
    hash_text,
    masking_policy,
    parse_rules,
    partial_text,
)
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
        ("shop.users.age=hash", "'shop.users.age=hash': hash fits text, ascii and varchar"),
        ("shop.users.prefs=partial:last:2", "partial fits text, ascii and varchar"),
    ],
)
def test_rules_that_do_not_fit_the_table_are_refused_naming_the_rule(rule: str, says: str) -> None:
    """An unknown column, a key column, or a method the type cannot take: a clear error."""
    with pytest.raises(MaskingError) as caught:
        column_masks(parse_rules(rule), "shop", "users", COLUMNS, ("id",), hash_key=KEY)
    assert says in str(caught.value)


def test_rules_of_other_tables_are_left_out() -> None:
    """A table gets only its own rules; another keyspace's table of the same name none."""
    rules = parse_rules("shop.users.email=hash; other.users.nope=null; shop.orders.x=null")
    masks = column_masks(rules, "shop", "users", COLUMNS, ("id",), hash_key=KEY)
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
        column_masks(parse_rules(rule), "shop", "places", ADDRESSED, ("id",), hash_key=KEY)
    assert says in str(caught.value)
    assert rule.split(";")[-1].strip() in str(caught.value)


def test_reconciliation_masks_cassandra_values_as_the_sink_stores_them() -> None:
    """The canonical form of a driver value of a masked column equals that of what the sink
    writes for the Debezium value (so masked tables reconcile), and never holds the value."""
    rules = parse_rules("shop.places.home.street=hash; shop.places.note=partial:last:2")
    masks = column_masks(rules, "shop", "places", ADDRESSED, ("id",), hash_key=KEY)
    table = addressed("shop.places.home.street=hash; shop.places.note=partial:last:2")
    struct = {"street": "1 Main St", "city": "Bern", "lines": ["a"], "zip": 3000}
    driver = Address("1 Main St", "Bern", ["a"], 3000)
    for column, cassandra_value, debezium_value in (
        ("home", driver, struct),
        ("note", "private note", "private note"),
    ):
        t = ADDRESSED[column]
        stored = for_postgres(t)(table.converters[column](debezium_value))
        assert for_masked(t, masks[column])(cassandra_value) == stored
    bad = for_masked(ADDRESSED["note"], masks["note"])("SECRET\x00")
    assert bad.startswith(UNCONVERTIBLE)
    assert "SECRET" not in bad


def event_of(table: str, **cells: Any) -> ChangeEvent:
    return replace(event(), table=table, cells={n: Cell(v, None) for n, v in cells.items()})
