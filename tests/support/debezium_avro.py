"""Debezium Cassandra envelopes in Avro and JSON, and the Confluent wire format, for tests."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import fastavro

NS = "io.debezium.connector.cassandra.prefix.ks.users"


def cell(value_type: Any, name: str = "cell_value") -> list[Any]:
    """Debezium's optional cell struct {value, deletion_ts, set}, as AvroData writes it."""
    return [
        "null",
        {
            "type": "record",
            "name": name,
            "fields": [
                {"name": "value", "type": ["null", value_type], "default": None},
                {"name": "deletion_ts", "type": ["null", "long"], "default": None},
                {"name": "set", "type": "boolean"},
            ],
            "connect.version": 1,
            "connect.name": "cell_value",
        },
    ]


def range_bound(name: str) -> dict[str, Any]:
    """The optional `_range_start` / `_range_end` field of `after`."""
    value = {
        "type": "record",
        "name": "clustering_value",
        "fields": [{"name": n, "type": "string"} for n in ("name", "value", "type")],
    }
    bound = {
        "type": "record",
        "name": name,
        "fields": [
            {"name": "method", "type": "string"},
            {"name": "values", "type": {"type": "array", "items": value}},
        ],
    }
    return {"name": name, "type": ["null", bound], "default": None}


SOURCE_FIELDS = [
    {"name": "connector", "type": "string"},
    {"name": "ts_us", "type": ["null", "long"], "default": None},
]
WHOLE_SOURCE_FIELDS = [  # what the sink reads of `source` to apply an event
    {"name": name, "type": kind}
    for name, kind in (("ts_us", "long"), ("keyspace", "string"), ("table", "string"))
]


def envelope(
    columns: list[tuple[str, Any]],
    *,
    namespace: str = NS,
    distinct_names: bool = False,
    source_fields: list[dict[str, Any]] = SOURCE_FIELDS,
) -> dict[str, Any]:
    """A Debezium Cassandra envelope schema. Every cell struct is named `cell_value`, as the
    connector does, unless distinct_names (a valid schema with the same binary encoding).
    `source_fields` are those of its `source` struct (WHOLE_SOURCE_FIELDS for events the sink
    can apply)."""
    after_fields = [
        {"name": column, "type": cell(t, f"cell_{column}" if distinct_names else "cell_value")}
        for column, t in columns
    ]
    end = range_bound("_range_end")
    if distinct_names:
        end["type"][1]["fields"][1]["type"]["items"]["name"] = "clustering_value_end"
    else:  # as AvroData writes it: the second use of a record refers to the first by name
        end["type"][1]["fields"][1]["type"]["items"] = "clustering_value"
    after_fields += [range_bound("_range_start"), end]
    source = {
        "type": "record",
        "name": "Source",
        "namespace": "io.debezium.connector.cassandra",
        "fields": source_fields,
    }
    return {
        "type": "record",
        "name": "Envelope",
        "namespace": namespace,
        "fields": [
            {"name": "ts_ms", "type": "long"},
            {"name": "op", "type": "string"},
            {"name": "source", "type": source},
            {"name": "after", "type": {"type": "record", "name": "after", "fields": after_fields}},
        ],
        "connect.name": f"{namespace}.Envelope",
    }


def key_schema(namespace: str = NS, columns: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
    """The Kafka key: the primary-key columns (default: `pk int`), each optional, as the
    connector builds it."""
    return {
        "type": "record",
        "name": "Key",
        "namespace": namespace,
        "fields": [
            {"name": name, "type": ["null", kind], "default": None}
            for name, kind in columns or [("pk", "int")]
        ],
    }


KEY_SCHEMA = key_schema()
COLUMNS = [("pk", "int"), ("name", "string"), ("score", "double")]


def wire(schema_id: int, writer_schema: Any, datum: Any) -> bytes:
    """Confluent wire format: magic 0, big-endian schema id, Avro binary body."""
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(writer_schema), datum)
    return b"\x00" + struct.pack(">I", schema_id) + body.getvalue()


def compact(obj: Any) -> bytes:
    """JSON as JsonConverter writes it: no whitespace."""
    return json.dumps(obj, separators=(",", ":")).encode()


def a_cell(value: Any) -> dict[str, Any]:
    """A cell as Debezium fills it: set, not expiring."""
    return {"value": value, "deletion_ts": None, "set": True}


def event(**cells: Any) -> dict[str, Any]:
    """An update envelope over COLUMNS; columns not given are untouched (null)."""
    after = {column: None for column, _ in COLUMNS} | {"_range_start": None, "_range_end": None}
    after.update(cells)
    return {
        "ts_ms": 1_730_000_000_123,
        "op": "u",
        "source": {"connector": "cassandra", "ts_us": 1_730_000_000_100_123},
        "after": after,
    }


def avro_record(**cells: Any) -> tuple[bytes, bytes]:
    """Key and value bytes written with a valid twin of the duplicate-name schema (id 2)."""
    key = wire(1, KEY_SCHEMA, {"pk": 7})
    return key, wire(2, envelope(COLUMNS, distinct_names=True), event(**cells))


def register(registry_url: str, subject: str, key: Any, value: Any) -> tuple[int, int]:
    """Register `key` and `value` (Avro schemas) as `subject`-key and -value in the registry
    at `registry_url`, with Confluent's client; their ids."""
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    with SchemaRegistryClient({"url": registry_url}) as client:
        key_id = client.register_schema(f"{subject}-key", Schema(json.dumps(key), "AVRO"))
        value_id = client.register_schema(f"{subject}-value", Schema(json.dumps(value), "AVRO"))
    return key_id, value_id
