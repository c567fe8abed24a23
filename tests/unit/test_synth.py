"""The synthetic Debezium Cassandra event generator (cdc_synth.synth)."""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cdc_sink.decode.decoder import Decoder
from cdc_sink.model.cql import from_connect_schema
from cdc_sink.model.events import ChangeEvent, Op, Position, interpret
from cdc_sink.schema.tables import parse_clustering_text
from cdc_synth import synth

START_US = 1_760_000_000_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _NoRegistry:
    async def schema_by_id(self, schema_id: int) -> str:
        raise AssertionError(f"JSON needs no registry (asked for id {schema_id})")


class _Registry:
    """The Avro schemas of every table under fixed ids, as a registry would serve them."""

    def __init__(self) -> None:
        self.ids: dict[str, tuple[int, int]] = {}
        self.texts: dict[int, str] = {}
        for n, table in enumerate(synth.TABLES):
            key, value = synth.avro_schemas(table)
            self.ids[table] = (2 * n + 1, 2 * n + 2)
            self.texts[2 * n + 1], self.texts[2 * n + 2] = json.dumps(key), json.dumps(value)

    async def schema_by_id(self, schema_id: int) -> str:
        return self.texts[schema_id]


@pytest.fixture(scope="module")
def events() -> list[synth.SynthEvent]:
    return synth.generate(10_000, seed=7, start_us=START_US)


def _partition(event: synth.SynthEvent) -> tuple[Any, ...]:
    return tuple(event.key[c] for c in synth.TABLES[event.table].partition_key)


def test_table_and_operation_mix_is_roughly_as_specified(events: list[synth.SynthEvent]) -> None:
    """Over 10,000 events: tables 40/40/20 %, ops 60 % insert, 30 % update, 10 % delete."""
    tables = Counter(e.table for e in events)
    ops = Counter("d" if e.op == "r" else e.op for e in events)
    assert tables["users"] == pytest.approx(4_000, abs=300)
    assert tables["orders"] == pytest.approx(4_000, abs=300)
    assert tables["sessions"] == pytest.approx(2_000, abs=250)
    assert ops["i"] == pytest.approx(6_000, abs=300)
    assert ops["u"] == pytest.approx(3_000, abs=300)
    assert ops["d"] == pytest.approx(1_000, abs=200)


def test_orders_get_row_partition_and_range_deletes(events: list[synth.SynthEvent]) -> None:
    """Order deletes include row deletes, partition deletes and range deletes (op r)."""
    kinds = Counter(
        "range" if e.op == "r" else "partition" if e.is_partition_delete else "row"
        for e in events
        if e.table == "orders" and e.op in ("d", "r")
    )
    assert kinds["row"] > kinds["partition"] > 0
    assert kinds["range"] > 0


def test_updates_and_deletes_target_keys_inserted_earlier(events: list[synth.SynthEvent]) -> None:
    """Updates and row deletes name inserted keys; partition/range deletes, inserted partitions."""
    keys: set[tuple[str, tuple[Any, ...]]] = set()
    partitions: set[tuple[str, tuple[Any, ...]]] = set()
    for event in events:
        key = (event.table, tuple(event.key.values()))
        if event.op == "i":
            keys.add(key)
            partitions.add((event.table, _partition(event)))
        elif event.op == "r" or event.is_partition_delete:
            assert (event.table, _partition(event)) in partitions
        else:
            assert key in keys, event


def test_updates_are_partial_and_sometimes_null(events: list[synth.SynthEvent]) -> None:
    """Updates write a proper subset of the non-key columns, and some write an explicit null."""
    updates = [e for e in events if e.op == "u"]
    for event in updates:
        regular = set(synth.TABLES[event.table].regular)
        assert event.cells
        assert set(event.cells) < regular
    assert any(None in e.cells.values() for e in updates)


def test_timestamps_increase_strictly_from_the_start(events: list[synth.SynthEvent]) -> None:
    """Write timestamps start after start_us and strictly increase."""
    stamps = [e.ts_us for e in events]
    assert stamps[0] > START_US
    assert all(a < b for a, b in itertools.pairwise(stamps))


def test_the_same_seed_gives_the_same_events() -> None:
    """Generation is deterministic for a seed and start time."""
    assert synth.generate(500, seed=3, start_us=START_US) == synth.generate(
        500, seed=3, start_us=START_US
    )


def test_order_ids_are_time_uuids_at_their_write_time(events: list[synth.SynthEvent]) -> None:
    """order_id is a version-1 UUID whose time is the insert's write timestamp."""
    inserts = [e for e in events if e.table == "orders" and e.op == "i"]
    for event in inserts[:100]:
        order_id: uuid.UUID = event.key["order_id"]
        assert order_id.version == 1
        unix_us = (order_id.time - 0x01B21DD213814000) // 10
        assert unix_us == event.ts_us


def _check(event: synth.SynthEvent, change: ChangeEvent) -> None:
    spec = synth.TABLES[event.table]
    assert change.op is Op(event.op)
    assert (change.keyspace, change.table, change.ts_us) == ("shop", event.table, event.ts_us)
    assert change.key == {k: None if v is None else str(v) for k, v in event.key.items()}, (
        "uuid keys are canonical strings"
    )
    if event.op in ("i", "u"):
        assert set(change.cells) == set(event.cells)
        for name, value in event.cells.items():
            got = change.cells[name]
            cql = spec.cql(name)
            if value is None:
                assert got.value in (None, [], {}), name  # an emptied collection is empty
                assert got.expires_us is None
            elif cql == "timestamp":
                assert got.value == (value - EPOCH) // timedelta(milliseconds=1)
            elif cql == "inet":
                assert got.value == f"/{value}"
            elif cql == "decimal":
                assert got.value == format(value, "f")
            elif cql.startswith("set<"):
                assert sorted(got.value) == sorted(value)
            elif cql.startswith("map<"):
                entries = got.value
                if isinstance(entries, list):  # Avro: MapEntry records
                    entries = {e["key"]: e["value"] for e in entries}
                assert entries == value
            else:
                assert got.value == (str(value) if isinstance(value, uuid.UUID) else value)
            if value is not None and event.ttl_s:
                assert got.expires_us == synth.expiry_us(event.ts_us, event.ttl_s)
    if event.op == "r":
        assert change.range_end is not None
        assert event.range_end is not None
        (name, text, marshal) = change.range_end.values[0]
        assert name == "order_id"
        assert parse_clustering_text(text, marshal) == event.range_end.values[0]
        assert change.range_end.inclusive == event.range_end.inclusive
    if event.is_partition_delete:
        assert change.is_partition_delete


async def test_json_envelopes_decode_and_interpret_to_the_generated_ops(
    events: list[synth.SynthEvent],
) -> None:
    """Each JSON envelope decodes and interprets to its event's op, key, timestamp and cells."""
    encoder, decoder = synth.JsonEncoder(), Decoder(_NoRegistry())
    for offset, event in enumerate(events):
        key, value = encoder.encode(event)
        decoded = await decoder.decode(key, value)
        assert decoded.format == "json"
        _check(event, interpret(decoded.key, decoded.value, Position("t", 0, offset)))


async def test_schemaless_json_decodes_to_the_payloads_of_the_envelopes(
    events: list[synth.SynthEvent],
) -> None:
    """Each schemaless JSON record (schemas.enable=false) decodes to its envelope's payload."""
    decoder = Decoder(_NoRegistry())
    for event in events:
        schemaless = await decoder.decode(*synth.SchemalessJsonEncoder().encode(event))
        enveloped = await decoder.decode(*synth.JsonEncoder().encode(event))
        assert schemaless.format == "json-schemaless"
        assert (schemaless.key, schemaless.value) == (enveloped.key, enveloped.value)


async def test_avro_envelopes_decode_and_interpret_to_the_generated_ops(
    events: list[synth.SynthEvent],
) -> None:
    """Each Avro envelope (Confluent wire format) decodes and interprets like its JSON twin."""
    registry = _Registry()
    encoder, decoder = synth.AvroEncoder(registry.ids), Decoder(registry)
    for offset, event in enumerate(events[:3_000]):
        key, value = encoder.encode(event)
        assert key[0] == value[0] == 0
        decoded = await decoder.decode(key, value)
        assert decoded.format == "avro"
        _check(event, interpret(decoded.key, decoded.value, Position("t", 0, offset)))


async def test_column_schemas_carry_the_connector_types() -> None:
    """Column schemas carry Debezium's uuid/timestamp names; inet and decimal are plain strings."""
    event = next(e for e in synth.generate(50, seed=1, start_us=START_US) if e.table == "users")
    decoded = await Decoder(_NoRegistry()).decode(*synth.JsonEncoder().encode(event))
    types = {c: str(from_connect_schema(s)) for c, s in decoded.column_schemas.items()}
    assert types == {
        "user_id": "uuid",
        "email": "text",
        "name": "text",
        "created_at": "timestamp",
        "balance": "text",
        "tags": "list<text>",
        "prefs": "map<text, text>",
        "last_ip": "text",
    }


def test_deletes_carry_tombstone_cells_and_ranges_only_bounds() -> None:
    """Deletes null every cell at their time, ranges carry only bounds, an emptied set is []."""
    orders = synth.TABLES["orders"]
    row = synth.SynthEvent("orders", "d", {"customer_id": uuid.uuid4(), "order_id": None}, {}, 5)
    _, value = synth.envelope(row)
    assert value["after"]["order_id"] == {"value": None, "deletion_ts": 5, "set": True}
    assert all(
        value["after"][c] == {"value": None, "deletion_ts": 5, "set": True} for c in orders.regular
    )
    bound = synth.RangeBound((uuid.uuid1(),), inclusive=False)
    ranged = synth.SynthEvent("orders", "r", row.key, {}, 6, range_start=None, range_end=bound)
    _, value = synth.envelope(ranged)
    assert [c for c, cell in value["after"].items() if cell is not None] == [
        "customer_id",
        "_range_end",
    ]
    assert value["after"]["_range_end"]["method"] == "EXCL_END_BOUND"
    cleared = synth.SynthEvent("users", "u", {"user_id": uuid.uuid4()}, {"tags": None}, 7)
    assert synth.envelope(cleared)[1]["after"]["tags"] == {
        "value": [],
        "deletion_ts": None,
        "set": True,
    }


def test_cql_ddl_declares_every_table_with_cdc() -> None:
    """The Cassandra DDL creates the keyspace and each table with its primary key and cdc."""
    ddl = synth.cql_ddl()
    assert ddl[0].startswith("CREATE KEYSPACE IF NOT EXISTS shop")
    assert "PRIMARY KEY ((customer_id), order_id)) WITH cdc = true" in ddl[2]
    assert len(ddl) == 1 + len(synth.TABLES)
