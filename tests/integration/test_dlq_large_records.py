"""Dead letters larger than a Kafka client's default request size (1 MiB): dead-lettered whole
where the DLQ topic takes them, kept whole in `_cdc_dlq_records` (and announced in the topic
without their record) where it does not, and replayed whole from there."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from cdc_sink.app import SinkApp
from tests.integration.test_dlq import counter_total, expected_row, good_mutation, sql
from tests.support.names import Unique
from tests.support.pipeline import (
    create_cassandra_model_table,
    create_topic,
    read_topic,
    run_cli,
    run_worker,
    schemaless_record,
    sink_env,
)
from tests.support.stack import Endpoints

MiB = 1024 * 1024
BIG = 5 * MiB
Headers = list[tuple[str, bytes | None]]
Record = tuple[bytes | None, bytes | None, Headers]


def big_poison(keyspace: str) -> Record:
    """5 MiB of bytes no decoder reads (random, so no compression would shrink them), with a
    header of its own."""
    key, _ = schemaless_record(good_mutation(10_000), keyspace)
    return key, b"\xff\xfe" + random.randbytes(BIG), [("trace", b"big-1")]


async def produce_records(bootstrap: str, topic: str, records: list[Record]) -> list[int]:
    """Produce every record (acks=all) to partition 0, allowing large ones; their offsets."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8 * MiB)
    await producer.start()
    try:
        pending = [
            await producer.send(topic, value, key=key, partition=0, headers=headers)
            for key, value, headers in records
        ]
        return [meta.offset for meta in await asyncio.gather(*pending)]
    finally:
        await producer.stop()


async def max_message_bytes(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})
        [response] = await admin.describe_configs([resource])
    finally:
        await admin.close()
    [(_, _, _, _, entries)] = response.resources
    return int(dict((entry[0], entry[1]) for entry in entries)["max.message.bytes"])


@dataclass(frozen=True)
class Scene:
    """Twenty good records with a 5 MiB poison one in the middle, on one partition of a topic
    that takes 10 MB, and a worker's settings for it."""

    env: dict[str, str]
    schema: str
    topic: str
    dlq_topic: str
    poison: Record
    offsets: list[int]  # of every record produced, the poison's the 11th

    @property
    def poison_offset(self) -> int:
        return self.offsets[10]


@pytest.fixture
async def scene(stack: Endpoints, unique: Unique) -> Scene:
    """The Scene, its records produced; its schema and keyspace go when the test ends."""
    keyspace, topic = unique.keyspace("ks"), unique("cdc-events-big")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, partitions=1, configs={"max.message.bytes": "10000000"})
    poison = big_poison(keyspace)
    good: list[Record] = [(*schemaless_record(good_mutation(i), keyspace), []) for i in range(20)]
    offsets = await produce_records(stack.kafka, topic, [*good[:10], poison, *good[10:]])
    schema, dlq_topic = unique.schema("big"), unique("dlq-events")
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, dlq__topic=dlq_topic)
    return Scene(env, schema, topic, dlq_topic, poison, offsets)


async def dead_lettered_whole(stack: Endpoints, scene: Scene, worker: SinkApp) -> int:
    """Check the worker got through every record, applied the good ones, and kept the poison
    whole in `_cdc_dlq_records`; return its row id."""
    assert worker.applied_events == len(scene.offsets)
    rows = await sql(
        stack.postgres_dsn, scene.schema, "SELECT p1, p2, c1, c2, v1, v2, v3 FROM cdc_model"
    )
    good = [good_mutation(i) for i in range(len(scene.offsets) - 1)]
    assert sorted(tuple(r) for r in rows) == sorted(expected_row(m) for m in good)
    [row] = await sql(
        stack.postgres_dsn,
        scene.schema,
        "SELECT id, source_offset, record_key, record_value, headers FROM _cdc_dlq_records",
    )
    assert row["source_offset"] == scene.poison_offset
    assert (row["record_key"], row["record_value"]) == scene.poison[:2]
    assert json.loads(row["headers"]) == [{"key": "trace", "value": "big-1"}]
    return int(row["id"])


async def test_a_5_mb_poison_record_is_dead_lettered_whole(stack: Endpoints, scene: Scene) -> None:
    """On a source topic that takes 10 MB, a 5 MiB poison record among good ones (it stopped
    the worker at every start once) is dead-lettered whole: the sink makes the DLQ topic take
    what its source takes, the record is there and in `_cdc_dlq_records` with its headers,
    the worker goes on and applies every good record."""
    worker = await run_worker(scene.env)
    dlq_id = await dead_lettered_whole(stack, scene, worker)
    assert counter_total(worker, "cdc_dlq_oversized_records_total") == 0

    assert await max_message_bytes(stack.kafka, scene.dlq_topic) >= 10_000_000
    [message] = await read_topic(stack.kafka, scene.dlq_topic)
    assert (message.key, message.value) == scene.poison[:2]
    headers = dict(message.headers)
    assert message.headers[0] == ("trace", b"big-1")
    assert headers["cdc.dlq.id"] == str(dlq_id).encode()
    assert headers["cdc.source.offset"] == str(scene.poison_offset).encode()
    assert "cdc.payload.stored" not in headers


async def test_a_record_too_large_for_the_dlq_topic_is_kept_in_postgres_and_replays(
    stack: Endpoints, scene: Scene
) -> None:
    """When the DLQ topic (made beforehand) takes at most 1 MiB, a 5 MiB poison record is kept
    whole in `_cdc_dlq_records` and the topic gets its error context without the record,
    with headers saying where it is; the worker goes on. `dlq replay ID` sends the whole record
    back to its topic and partition, where the worker dead-letters it again, whole."""
    await create_topic(
        stack.kafka, scene.dlq_topic, partitions=1, configs={"max.message.bytes": str(MiB)}
    )
    worker = await run_worker(scene.env)
    dlq_id = await dead_lettered_whole(stack, scene, worker)
    assert counter_total(worker, "cdc_dlq_oversized_records_total") == 1

    [message] = await read_topic(stack.kafka, scene.dlq_topic)
    assert (message.key, message.value) == (None, b"")
    headers = {k: (v or b"").decode() for k, v in message.headers}
    assert "trace" not in headers  # the record's own headers are in the table only
    assert headers["cdc.payload.stored"] == "postgres"
    assert headers["cdc.dlq.id"] == str(dlq_id)
    assert int(headers["cdc.payload.bytes"]) > BIG
    assert (headers["cdc.source.topic"], headers["cdc.source.offset"]) == (
        scene.topic,
        str(scene.poison_offset),
    )
    assert headers["cdc.error.class"] == "DecodeError"

    replayed = await asyncio.to_thread(
        run_cli, scene.env, "dlq", "replay", str(dlq_id), timeout=120
    )
    assert replayed.returncode == 0, replayed.stderr
    *_, again = await read_topic(stack.kafka, scene.topic)
    end = scene.offsets[-1] + 1
    assert (again.offset, again.key, again.value) == (end, *scene.poison[:2])
    assert list(again.headers) == [*scene.poison[2], ("cdc.replay.of", str(dlq_id).encode())]

    await run_worker(scene.env)
    letters = await sql(
        stack.postgres_dsn,
        scene.schema,
        "SELECT source_offset, record_value, status FROM _cdc_dlq_records ORDER BY id",
    )
    assert [(r["source_offset"], r["status"]) for r in letters] == [
        (scene.poison_offset, "replayed"),
        (end, "pending"),
    ]
    assert letters[1]["record_value"] == scene.poison[1]
