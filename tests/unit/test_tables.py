"""Identifiers are always quoted, and names PostgreSQL would alter are refused clearly."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cdc_sink.errors import ConversionError, EventError
from cdc_sink.model.cql import parse_cql_type
from cdc_sink.model.events import ChangeEvent, Op, Position, interpret
from cdc_sink.schema.tables import (
    IdentifierError,
    ReservedColumnError,
    TableOwnerError,
    TableSchema,
    lock_id,
    lock_ids,
    name_collisions,
    quote_ident,
    refuse_reserved,
    require_owner,
    target_name,
    topic_source,
)

INT = parse_cql_type("int")


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("select", '"select"'),
        ("Order", '"Order"'),
        ('a"b', '"a""b"'),
        ("名前", '"名前"'),
        ("x" * 63, '"' + "x" * 63 + '"'),
    ],
)
def test_quote_ident_quotes_every_name(name: str, quoted: str) -> None:
    """Reserved words, capitals, quotes and unicode come out as quoted identifiers."""
    assert quote_ident(name) == quoted


@pytest.mark.parametrize("name", ["x" * 64, "ü" * 32, "", "a\x00b"])
def test_quote_ident_refuses_names_postgres_would_alter(name: str) -> None:
    """Over 63 bytes (PostgreSQL would truncate), empty, or with NUL: a clear error."""
    with pytest.raises(IdentifierError):
        quote_ident(name)


def test_table_name_format_fills_table_and_keyspace() -> None:
    """CDC_SINK__TABLE_NAME_FORMAT takes {table} and optionally {keyspace}."""
    assert target_name("cdc_{table}", "shop", "users") == "cdc_users"
    assert target_name("{keyspace}__{table}", "shop", "users") == "shop__users"


def test_schema_with_a_hostile_column_name_builds_quoted_ddl() -> None:
    """DDL for a table whose names are SQL keywords and quotes quotes every identifier."""
    schema = TableSchema(
        "ks",
        "Order",
        "cdc_Order",
        ("select",),
        {"select": parse_cql_type("int"), 'a"b': parse_cql_type("text")},
    )
    sql = schema.create_sql("public")
    assert 'CREATE TABLE IF NOT EXISTS "public"."cdc_Order"' in sql
    assert '"select" integer' in sql
    assert '"a""b" text' in sql
    assert 'PRIMARY KEY ("select")' in sql


def test_a_too_long_column_name_is_refused_when_the_schema_is_built() -> None:
    """A 64-byte column name stops at schema construction (the record is dead-lettered)."""
    with pytest.raises(IdentifierError, match="63"):
        TableSchema(
            "ks",
            "t",
            "cdc_t",
            ("id",),
            {"id": parse_cql_type("int"), "c" * 64: parse_cql_type("int")},
        )


def test_conversion_error_names_the_column() -> None:
    """A value that does not fit its column is reported with the column's name."""
    schema = TableSchema(
        "ks", "t", "cdc_t", ("id",), {"id": parse_cql_type("int"), "n": parse_cql_type("smallint")}
    )
    value = {
        "op": "u",
        "source": {"keyspace": "ks", "table": "t", "ts_us": 1},
        "after": {
            "id": {"value": 1, "deletion_ts": None, "set": True},
            "n": {"value": 70000, "deletion_ts": None, "set": True},
        },
    }
    event = interpret({"id": 1}, value, Position("t", 0, 0))
    assert event.op is Op.UPDATE
    with pytest.raises(Exception, match="column 'n'"):
        schema.to_mutation(event)


def _users_event(key: dict[str, Any], cells: dict[str, Any]) -> tuple[TableSchema, ChangeEvent]:
    schema = TableSchema(
        "ks",
        "users",
        "cdc_users",
        ("id",),
        {
            "id": parse_cql_type("uuid"),
            "ip": parse_cql_type("inet"),
            "tags": parse_cql_type("set<text>"),
        },
    )
    value = {
        "op": "u",
        "source": {"keyspace": "ks", "table": "users", "ts_us": 1},
        "after": {n: {"value": v, "deletion_ts": None, "set": True} for n, v in cells.items()},
    }
    return schema, interpret(key, value, Position("t", 0, 0))


def test_to_mutation_converts_key_and_cells_as_each_column_converter_does() -> None:
    """The per-record path gives what the checked, column-by-column conversion gives."""
    schema, event = _users_event(
        {"id": "5f0b8f5e-1c8f-4f4e-9a39-3f1c2f4d5e6a"}, {"ip": "/10.0.0.1", "tags": ["a"]}
    )
    mutation = schema.to_mutation(event)
    assert (mutation.key, dict(mutation.values)) == schema._checked_values(event)
    assert str(mutation.key[0]) == "5f0b8f5e-1c8f-4f4e-9a39-3f1c2f4d5e6a"


def test_to_mutation_names_the_key_column_whose_value_does_not_fit() -> None:
    """A bad key value is reported with its column, as a bad cell value is."""
    schema, event = _users_event({"id": "not-a-uuid"}, {"ip": "/10.0.0.1"})
    with pytest.raises(ConversionError, match=r"column 'id'.*not a UUID"):
        schema.to_mutation(event)


def test_to_mutation_refuses_a_key_without_every_primary_key_column() -> None:
    """A key lacking a primary-key column is an EventError naming it, not a KeyError."""
    schema, event = _users_event({"other": 1}, {"ip": "/10.0.0.1"})
    with pytest.raises(EventError, match=r"lacks primary-key column.*id"):
        schema.to_mutation(event)


@pytest.mark.parametrize("name", ["_cdc_cells", "_cdc_updated_at", "xmin", "ctid", "tableoid"])
def test_reserved_column_names_are_refused_naming_the_column(name: str) -> None:
    """A column named like one of the sink's own or a PostgreSQL system column is refused, and
    so is a table schema planned with one."""
    with pytest.raises(ReservedColumnError, match=f"column '{name}' of ks.t has a name"):
        refuse_reserved("ks", "t", ["id", name])
    with pytest.raises(ReservedColumnError):
        TableSchema("ks", "t", "cdc_t", ("id",), {"id": INT, name: INT})


@pytest.mark.parametrize("name", ["_CDC_CELLS", "_cdc_Cells", "Xmin", "ctid ", "_cdc_cells2"])
def test_only_exact_reserved_names_clash(name: str) -> None:
    """Identifiers are quoted, so a name differing in case or by a character is an ordinary
    column."""
    refuse_reserved("ks", "t", [name])
    assert name in TableSchema("ks", "t", "cdc_t", ("id",), {"id": INT, name: INT}).columns


def test_a_target_table_refuses_events_of_another_source_saying_what_to_change() -> None:
    """The owner passes; another keyspace's table of the same name is told both sources and
    the setting, with `{keyspace}` to add, or a separator when it is already there."""
    users = TableSchema("shop", "users", "cdc_users", ("id",), {"id": INT})
    require_owner(users, "shop", "users", "cdc_{table}")
    with pytest.raises(TableOwnerError) as refused:
        require_owner(users, "crm", "users", "cdc_{table}")
    assert str(refused.value).startswith(
        "target table 'cdc_users' is owned by shop.users (recorded in _cdc_schema_metadata), "
        "and crm.users maps to the same name under CDC_SINK__TABLE_NAME_FORMAT='cdc_{table}': "
        "put {keyspace} in it (e.g. 'cdc_{keyspace}_{table}')"
    )
    joined = TableSchema("a_b", "c", "a_b_c", ("id",), {"id": INT})
    with pytest.raises(TableOwnerError, match=re.escape("separate {keyspace} and {table}")):
        require_owner(joined, "a", "b_c", "{keyspace}_{table}")


@pytest.mark.parametrize(
    ("topic", "source"),
    [
        ("debezium.shop.users", ("shop", "users")),
        ("cdc-events-shop-users", ("shop", "users")),
        ("cdc-events-owner_ab12-Shop_2-user_list", ("Shop_2", "user_list")),
        ("cdc-events-users", ("events", "users")),
        ("users", None),
        ("prefix_shop_users", None),  # `_` is part of Cassandra's names: no telling
        ("a.shop-users", None),  # two different delimiters
    ],
)
def test_topic_source_reads_debezium_topic_names(topic: str, source: tuple[str, str]) -> None:
    """`<prefix><delimiter><keyspace><delimiter><table>` with a non-word delimiter."""
    assert topic_source(topic) == source


def test_name_collisions_are_targets_that_tables_of_several_keyspaces_map_to() -> None:
    """Two keyspaces' `users` meet in `cdc_users`, not with {keyspace} in the format; topics
    whose names tell no source are left out."""
    topics = ["cdc.shop.users", "cdc.crm.users", "cdc.shop.orders", "cdc.crm.users", "other"]
    assert name_collisions(topics, "cdc_{table}") == {"cdc_users": ["crm.users", "shop.users"]}
    assert name_collisions(topics, "cdc_{keyspace}_{table}") == {}


def test_to_mutation_takes_an_empty_non_frozen_collection_for_the_deletion_it_is() -> None:
    """Debezium's empty list, set and map ({} or JsonConverter's [] of pairs) on a non-frozen
    column become null and are named as emptied; empty frozen collections stay values."""
    types = {
        "id": "int",
        "l": "list<int>",
        "s": "set<text>",
        "m": "map<text, int>",
        "pairs": "map<int, text>",
        "fl": "frozen<list<int>>",
        "fm": "frozen<map<text, int>>",
        "full": "set<int>",
    }
    schema = TableSchema(
        "ks", "t", "cdc_t", ("id",), {n: parse_cql_type(t) for n, t in types.items()}
    )
    cells = {"l": [], "s": [], "m": {}, "pairs": [], "fl": [], "fm": {}, "full": [1]}
    value = {
        "op": "u",
        "source": {"keyspace": "ks", "table": "t", "ts_us": 1},
        "after": {n: {"value": v, "deletion_ts": None, "set": True} for n, v in cells.items()},
    }
    mutation = schema.to_mutation(interpret({"id": 1}, value, Position("t", 0, 0)))
    assert mutation.emptied == ("l", "s", "m", "pairs")
    assert dict(mutation.values) == {
        "l": None,
        "s": None,
        "m": None,
        "pairs": None,
        "fl": [],
        "fm": "{}",
        "full": [1],
    }


def test_lock_ids_are_lock_id_of_each_part() -> None:
    """The batched form gives the ids lock_id gives one by one (workers of either kind must
    take the same locks), non-ASCII and empty parts included."""
    parts = ['["a"]', '[1,"ü🙂"]', "", '["x\\u0000y"]', "[null]"]
    assert lock_ids("cdc_taßle", parts) == {lock_id("cdc_taßle", p) for p in parts}
    assert lock_ids("t", []) == set()
    assert lock_id("t", '["a"]') == -1631991419696882922
