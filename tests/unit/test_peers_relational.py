"""The side-by-side benchmark's pure parts (benchmarks/peers): the generator's mutations as a
relational Debezium source's change records, and the Kafka Connect properties."""

from __future__ import annotations

import itertools
import json
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cdc_synth import synth

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))

import connect  # noqa: E402
import relational  # noqa: E402

START_US = 1_760_000_000_000_000


def _stream(n: int, tombstones: bool, seed: int = 5) -> tuple[synth.Generator, Any, list[Any]]:
    generator = synth.Generator(seed, start_us=START_US)
    replica = relational.Replica(tombstones=tombstones)
    changes = list(replica.changes(generator.take(n)))
    return generator, replica, changes


def _generator_keys(generator: synth.Generator) -> dict[str, set[tuple[Any, ...]]]:
    return {
        "users": {(user,) for user in generator.users.items},
        "orders": set(generator.orders.items),
        "sessions": {(session,) for session in generator.sessions.items},
    }


def _sink_replay(records: list[tuple[str, bytes, bytes | None]]) -> dict[str, dict[str, Any]]:
    """What an upserting, deleting sink keyed by the record key makes of the encoded records:
    the `after` image on c/u, the row gone on d, tombstones ignored."""
    tables: dict[str, dict[str, Any]] = {table: {} for table in synth.TABLES}
    for table, key, value in records:
        row_key = json.dumps(json.loads(key)["payload"], sort_keys=True)
        if value is None:
            continue
        payload = json.loads(value)["payload"]
        if payload["op"] == "d":
            del tables[table][row_key]
        else:
            tables[table][row_key] = payload["after"]
    return tables


def test_final_rows_are_the_generators_live_keys() -> None:
    """After 10,000 mutations (partial updates, row, partition and range deletes) the replica
    holds exactly the keys the generator's model holds, table by table."""
    generator, replica, _ = _stream(10_000, tombstones=True)
    assert {t: set(rows) for t, rows in replica.rows.items()} == _generator_keys(generator)
    assert {t: len(rows) for t, rows in replica.rows.items()} == generator.live_rows()
    assert all(len(rows) > 100 for rows in replica.rows.values())


def test_encoded_stream_replayed_by_a_key_upserting_sink_gives_the_replica() -> None:
    """Upserting each record's full after-image by its key and deleting on op d, from the JSON
    bytes alone, ends with exactly the replica's rows in the comparison's canonical form."""
    _, replica, changes = _stream(5_000, tombstones=True)
    encoder = relational.JsonRecords()
    records = [(c.table, *encoder.encode(c)) for c in changes]
    replayed = _sink_replay(records)
    for table, spec in synth.TABLES.items():
        expected = relational.canonical_rows(spec, replica.rows[table].values())
        assert relational.canonical_rows(spec, replayed[table].values()) == expected


def test_images_are_full_and_chain_per_key() -> None:
    """Every `after` names every column; each change's `before` is the key's previous `after`
    (None for a create); op c only for a new key, u for a stored one, d with no `after`."""
    _, _, changes = _stream(5_000, tombstones=False)
    last: dict[tuple[str, str], dict[str, Any] | None] = {}
    ops = set()
    for change in changes:
        spec = synth.TABLES[change.table]
        where = (change.table, repr(sorted(change.key.items())))
        previous = last.get(where)
        assert change.before == previous
        assert change.op == ("c" if previous is None else change.op)
        if change.op == "d":
            assert change.after is None
        else:
            assert change.after is not None
            assert list(change.after) == [name for name, _ in spec.columns]
        last[where] = change.after
        ops.add(change.op)
    assert ops == {"c", "u", "d"}


def test_a_partial_update_keeps_the_columns_it_does_not_write() -> None:
    """An update that writes `name` and nulls `last_ip` keeps `email` from the insert."""
    replica = relational.Replica()
    user = uuid.uuid4()

    def event(op: str, cells: dict[str, Any], ts: int) -> synth.SynthEvent:
        return synth.SynthEvent("users", op, {"user_id": user}, cells, ts)

    replica.apply(event("i", {"email": "a@x", "name": "A", "last_ip": "10.0.0.1"}, 1))
    [change] = replica.apply(event("u", {"name": "B", "last_ip": None}, 2))
    assert change.op == "u"
    assert change.after is not None
    assert change.after["email"] == "a@x"
    assert change.after["name"] == "B"
    assert change.after["last_ip"] is None


def test_deletes_are_followed_by_a_tombstone_only_when_asked() -> None:
    """With tombstones each op d is followed by a value-less record with the same key; without,
    there are none, and otherwise the two streams are the same."""
    _, _, with_tombstones = _stream(5_000, tombstones=True)
    _, _, without = _stream(5_000, tombstones=False)
    encoder = relational.JsonRecords()
    deletes = 0
    for change, following in itertools.pairwise(with_tombstones):
        if change.op == "d":
            deletes += 1
            assert following.op is None
            assert encoder.encode(following) == (encoder.encode(change)[0], None)
    assert deletes > 0
    assert [c for c in with_tombstones if c.op is not None] == without
    assert all(c.op is not None for c in without)


def test_payloads_carry_the_fields_their_schemas_declare() -> None:
    """The key payload's fields and the `after` payload's fields are those the JsonConverter
    schema beside them names, in order."""
    _, _, changes = _stream(2_000, tombstones=False)
    encoder = relational.JsonRecords()
    for change in changes[:200]:
        key, value = encoder.encode(change)
        assert value is not None
        key_doc, value_doc = json.loads(key), json.loads(value)
        assert [f["field"] for f in key_doc["schema"]["fields"]] == list(key_doc["payload"])
        envelope = {f["field"]: f for f in value_doc["schema"]["fields"]}
        image = value_doc["payload"]["after"] or value_doc["payload"]["before"]
        assert [f["field"] for f in envelope["after"]["fields"]] == list(image)


def test_canonical_values_agree_across_column_types() -> None:
    """A timestamp with or without a zone, a decimal as numeric or text, a map as JSON text or
    a dict, and an empty collection or null each reduce to one value."""
    moment = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert relational.canonical("timestamp", moment) == relational.canonical(
        "timestamp", moment.replace(tzinfo=None)
    )
    assert relational.canonical("timestamp", moment) == relational.connect_value(
        "timestamp", moment
    )
    assert relational.canonical("decimal", Decimal("1.50")) == relational.canonical(
        "decimal", "1.50"
    )
    assert relational.canonical("map<text, text>", '{"a": "1"}') == relational.canonical(
        "map<text, text>", {"a": "1"}
    )
    assert relational.canonical("set<text>", []) is None
    assert relational.canonical("list<text>", None) is None


def test_a_cql_type_without_a_relational_schema_is_refused() -> None:
    """A column type the encoder has no Connect schema for fails loudly, not as a string."""
    with pytest.raises(ValueError, match="tuple"):
        relational._field_schema("tuple<int, text>", True)


def test_the_poms_kafka_is_the_stacks() -> None:
    """The connector runs on the Kafka Connect version of the broker the local stack runs."""
    import stack

    assert connect.pom_property("kafka.version") == stack.KAFKA_VERSION
    assert connect.pom_property("debezium.version") == "3.6.0.Final"
    with pytest.raises(ValueError, match="nothing"):
        connect.pom_property("nothing")


def test_connector_properties() -> None:
    """One task, upsert, deletes, key from the record key, batches of 1,000, tables in the
    given schema, the login taken from the DSN."""
    text = connect.connector_properties(
        "peer-1",
        ["a", "b"],
        "postgresql://us%40r:p%3Ass@127.0.0.1:15432/cdc",
        "peer_1",
        reduction_buffer=True,
    )
    values = dict(line.split("=", 1) for line in text.splitlines())
    assert values["tasks.max"] == "1"
    assert values["topics"] == "a,b"
    assert values["insert.mode"] == "upsert"
    assert values["delete.enabled"] == "true"
    assert values["primary.key.mode"] == "record_key"
    assert values["batch.size"] == "1000"
    assert values["use.reduction.buffer"] == "true"
    assert values["collection.name.format"] == "peer_1.${topic}"
    assert values["connection.url"] == "jdbc:postgresql://127.0.0.1:15432/cdc"
    assert (values["connection.username"], values["connection.password"]) == ("us@r", "p:ss")
    assert connect.property_value(text, "name") == "peer-1"


def test_worker_properties_bind_loopback() -> None:
    """The worker's REST API listens on 127.0.0.1 only."""
    text = connect.worker_properties("127.0.0.1:9092", Path("/tmp/o"), 4567)
    assert connect.property_value(text, "listeners") == "http://127.0.0.1:4567"


def test_a_dsn_that_is_not_postgresql_is_refused() -> None:
    """jdbc_login only takes postgresql:// DSNs with a host."""
    with pytest.raises(ValueError, match="postgresql"):
        connect.jdbc_login("mysql://u:p@h/db")
