"""Decoding against the stack's real schema registry, through its Confluent-compatible API."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from cdc_sink.decode.decoder import Decoder
from cdc_sink.decode.registry import ConfluentRegistry
from cdc_sink.errors import DecodeError
from tests.support.debezium_avro import COLUMNS, a_cell, envelope, event, key_schema, wire
from tests.support.registry import store_without_validation
from tests.support.stack import Endpoints


async def test_records_decode_with_schemas_from_the_real_registry(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """Key and value schemas registered with Confluent's client decode through ConfluentRegistry."""
    namespace, topic = unique("ns"), unique("cdc-events-users")
    key_avro = key_schema(namespace)
    value_avro = envelope(COLUMNS, namespace=namespace, distinct_names=True)
    with SchemaRegistryClient({"url": stack.schema_registry_url}) as client:
        key_id = client.register_schema(f"{topic}-key", Schema(json.dumps(key_avro), "AVRO"))
        value_id = client.register_schema(f"{topic}-value", Schema(json.dumps(value_avro), "AVRO"))
    row = event(pk=a_cell(5), name=a_cell("Grace"), score=a_cell(2.5))

    async with ConfluentRegistry(stack.schema_registry_url) as registry:
        decoded = await Decoder(registry).decode(
            wire(key_id, key_avro, {"pk": 5}), wire(value_id, value_avro, row)
        )
    assert (decoded.key, decoded.value) == ({"pk": 5}, row)
    assert (decoded.schema_id, decoded.format) == (value_id, "avro")
    assert decoded.key_schema == {"pk": {"type": "int32", "optional": True}}
    assert {c: s["type"] for c, s in decoded.column_schemas.items()} == {
        "pk": "int32",
        "name": "string",
        "score": "double",
    }


async def test_a_registered_envelope_redefining_cell_value_decodes(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """The Confluent API refuses a schema that redefines `cell_value` (HTTP 422, as Confluent's
    own registry does); Apicurio's native API stores it, and the decoder reads it by id."""
    namespace = unique("ns")
    schema = envelope(COLUMNS, namespace=namespace)
    text = json.dumps(schema)
    subject = f"{unique('cdc-events')}-value"
    with (
        SchemaRegistryClient({"url": stack.schema_registry_url}) as client,
        pytest.raises(SchemaRegistryError) as refused,
    ):
        client.register_schema(subject, Schema(text, "AVRO"))
    assert refused.value.http_status_code == 422

    schema_id = store_without_validation(stack.schema_registry_url, unique("artifact"), text)
    row = event(pk=a_cell(1), name=a_cell("Ada"), score=a_cell(-0.5))
    writer = envelope(COLUMNS, namespace=namespace, distinct_names=True)  # same encoding
    async with ConfluentRegistry(stack.schema_registry_url) as registry:
        assert json.loads(await registry.schema_by_id(schema_id)) == schema
        decoded = await Decoder(registry).decode(None, wire(schema_id, writer, row))
    assert decoded.value == row
    assert decoded.column_schemas["name"] == {"type": "string", "optional": True}


async def test_an_id_unknown_to_the_real_registry_is_poison(stack: Endpoints) -> None:
    """A schema id the registry has never issued is a DecodeError naming the id."""
    value = b"\x00" + struct.pack(">I", 2_000_000_000) + b"\x02"
    async with ConfluentRegistry(stack.schema_registry_url) as registry:
        with pytest.raises(DecodeError, match="unknown schema id 2000000000"):
            await Decoder(registry).decode(None, value)
