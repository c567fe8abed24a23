"""Identifiers are always quoted, and names PostgreSQL would alter are refused clearly."""

from __future__ import annotations

import pytest

from cdc_sink.events import Op, Position, interpret
from cdc_sink.tables import IdentifierError, TableSchema, quote_ident, target_name
from cdc_sink.types import parse_cql_type


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
