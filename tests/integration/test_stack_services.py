"""Smoke tests: every service of the stack is the real thing and does its job."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import asyncpg
import hvac
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from prometheus_client import CollectorRegistry, Gauge, delete_from_gateway, push_to_gateway

from tests.support.names import Unique
from tests.support.pipeline import cassandra_session
from tests.support.stack import Endpoints

PARTITIONS = 8


async def test_kafka_round_trip_with_consumer_group(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """Records produced to an 8-partition topic come back through a group that commits offsets."""
    topic, group = unique("smoke-topic"), unique("smoke-group")
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, replication_factor=1)])
    finally:
        await admin.close()

    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(200)}
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, acks="all")
    await producer.start()
    try:
        results = [await producer.send(topic, value, key=key) for key, value in sent.items()]
        metadata = await asyncio.gather(*results)
    finally:
        await producer.stop()
    assert len({m.partition for m in metadata}) == PARTITIONS

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=stack.kafka,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    received: dict[bytes, bytes] = {}
    try:
        deadline = time.monotonic() + 60
        while len(received) < len(sent) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                received.update({r.key: r.value for r in records if r.key is not None})
        await consumer.commit()
        assigned = consumer.assignment()
        committed = {tp: await consumer.committed(tp) for tp in assigned}
        ends = await consumer.end_offsets(list(assigned))
    finally:
        await consumer.stop()

    assert received == sent
    assert len(assigned) == PARTITIONS
    assert committed == ends

    # A new member of the same group resumes after the committed offsets: nothing is re-read.
    again = AIOKafkaConsumer(
        topic,
        bootstrap_servers=stack.kafka,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await again.start()
    try:
        batch = await again.getmany(timeout_ms=3000)
        assert sum(len(records) for records in batch.values()) == 0
        assert {tp: await again.position(tp) for tp in again.assignment()} == ends
    finally:
        await again.stop()


async def test_postgres_round_trip(stack: Endpoints, unique: Unique) -> None:
    """The cdc_sink role creates a schema and table and reads back the types the sink writes."""
    schema = unique.schema("smoke")
    conn = await asyncpg.connect(stack.postgres_dsn)
    try:
        version = await conn.fetchval("SHOW server_version_num")
        assert int(version) >= 150000
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(
            f'CREATE TABLE "{schema}".t (id uuid PRIMARY KEY, amount numeric, '
            "tags text[], doc jsonb, at timestamptz, raw bytea)"
        )
        await conn.execute(
            f'INSERT INTO "{schema}".t VALUES '
            "(gen_random_uuid(), 12345678901234567890.000000001, '{a,b}', "
            "'{\"k\": [1, 2]}', '1969-07-20 20:17:40+00', '\\x00ff')"
        )
        row = await conn.fetchrow(f'SELECT amount, tags, doc, raw FROM "{schema}".t')
        assert row["amount"] == Decimal("12345678901234567890.000000001")
        assert row["tags"] == ["a", "b"]
        assert json.loads(row["doc"]) == {"k": [1, 2]}
        assert row["raw"] == b"\x00\xff"
    finally:
        await conn.close()


def test_cassandra_round_trip_and_cdc_log(stack: Endpoints, unique: Unique) -> None:
    """A table WITH cdc = true stores rows, and after a flush its mutations are in cdc_raw."""
    keyspace = unique.keyspace("smoke")
    marker = unique("cdc-marker")
    session = cassandra_session(stack)
    try:
        session.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute(
            f"CREATE TABLE {keyspace}.users (id int, seq int, name text, "
            "PRIMARY KEY (id, seq)) WITH cdc = true"
        )
        session.execute(f"INSERT INTO {keyspace}.users (id, seq, name) VALUES (1, 1, %s)", [marker])
        row = session.execute(f"SELECT name FROM {keyspace}.users WHERE id = 1 AND seq = 1").one()
        assert row.name == marker
        options = session.execute(
            "SELECT cdc FROM system_schema.tables WHERE keyspace_name = %s AND table_name = %s",
            [keyspace, "users"],
        ).one()
        assert options.cdc is True

        flush = subprocess.run(
            [*stack.nodetool, "flush", keyspace, "users"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert flush.returncode == 0, flush.stdout + flush.stderr
        cdc_raw = Path(stack["CDC_STACK_CASSANDRA_CDC_RAW"])
        # The stack's Debezium agent deletes a segment and its index once it has read them:
        # each look reads both together, and looks again if the agent took them meanwhile.
        deadline = time.monotonic() + 30
        indexed: list[int] = []
        while time.monotonic() < deadline and not indexed:
            for segment in cdc_raw.glob("CommitLog-*.log"):
                try:
                    if marker.encode() in segment.read_bytes():
                        index = segment.with_name(segment.stem + "_cdc.idx")
                        indexed += [int(word) for word in index.read_text().split()[:1]]
                except FileNotFoundError:
                    continue
            time.sleep(0 if indexed else 0.5)
        assert indexed, f"no commit log segment in {cdc_raw} holds the mutation with its index"
        assert indexed[0] > 0
    finally:
        session.cluster.shutdown()


def test_openbao_kv_round_trip(stack: Endpoints, unique: Callable[[str], str]) -> None:
    """A KV v2 secret written through hvac is read back from the OpenBao server."""
    client = hvac.Client(url=stack.vault_addr, token=stack.vault_token)
    assert client.is_authenticated()
    health = client.sys.read_health_status(method="GET")
    assert health["initialized"]
    assert not health["sealed"]
    path = unique("smoke/cassandra")
    secret = {"username": "cdc_reader", "password": unique("pw")}
    client.secrets.kv.v2.create_or_update_secret(path=path, secret=secret)
    try:
        read = client.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)
        assert read["data"]["data"] == secret
        assert read["data"]["metadata"]["version"] == 1
    finally:
        client.secrets.kv.v2.delete_metadata_and_all_versions(path=path)


def test_schema_registry_confluent_api(stack: Endpoints, unique: Callable[[str], str]) -> None:
    """An Avro schema registered through the Confluent API comes back by id, and versions evolve."""
    subject = unique("cdc-events-smoke") + "-value"
    first = {
        "type": "record",
        "name": "Row",
        "namespace": "smoke",
        "fields": [{"name": "id", "type": "int"}],
    }
    optional_name = {"name": "name", "type": ["null", "string"], "default": None}
    second = {**first, "fields": [*first["fields"], optional_name]}
    with SchemaRegistryClient({"url": stack.schema_registry_url}) as client:
        first_id = client.register_schema(subject, Schema(json.dumps(first), "AVRO"))
        second_id = client.register_schema(subject, Schema(json.dumps(second), "AVRO"))
    assert first_id != second_id

    # A fresh client has no cache from registering: these answers come from the registry.
    with SchemaRegistryClient({"url": stack.schema_registry_url}) as fresh:
        assert json.loads(fresh.get_schema(first_id).schema_str) == first
        assert fresh.get_schema(second_id).schema_type == "AVRO"
        latest = fresh.get_latest_version(subject)
    assert latest.version == 2
    assert latest.schema_id == second_id
    assert json.loads(latest.schema.schema_str) == second


def test_pushgateway_metric_is_scraped_by_prometheus(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """A gauge pushed to the Pushgateway shows up in a Prometheus query."""
    job = unique("smoke_job")
    registry = CollectorRegistry()
    gauge = Gauge("cdc_smoke_value", "smoke test gauge", registry=registry)
    gauge.set(42.5)
    gateway = stack.pushgateway_url
    push_to_gateway(gateway, job=job, registry=registry)
    try:
        query = urllib.parse.urlencode({"query": f'cdc_smoke_value{{job="{job}"}}'})
        deadline = time.monotonic() + 60
        result: list[dict[str, object]] = []
        while time.monotonic() < deadline and not result:
            url = f"{stack.prometheus_url}/api/v1/query?{query}"
            with urllib.request.urlopen(url, timeout=5) as response:
                result = json.loads(response.read())["data"]["result"]
            if not result:
                time.sleep(1)
        assert result, "Prometheus never scraped the pushed metric"
        assert result[0]["value"][1] == "42.5"  # type: ignore[index]
    finally:
        delete_from_gateway(gateway, job=job)
