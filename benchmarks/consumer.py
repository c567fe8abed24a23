"""CPU per record of the Kafka consumer clients alone, on the records the connector writes.

    .venv/bin/python benchmarks/consumer.py [--events 50000] [--format json|json-schemaless|avro]
                                            [--rounds 2]

Produces `--events` synth events (cdc_synth.synth, encoded as `run.py` encodes them) to a fresh
topic of 8 partitions, then reads it to its end with each client in turn, touching each
record's key, value and offset: aiokafka as the worker configures it (fetch sizes from
KafkaConfig's defaults, CRC checks on), aiokafka without CRC checks, aiokafka with 1 MiB per
partition, and confluent-kafka (librdkafka) with and without CRC checks. Prints the process CPU
per record (librdkafka's threads included) over the records after the first fetch (which also
pays for connecting). The topic
is deleted at the end. The Avro records carry made-up schema ids: no registry is involved.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from cdc_sink.config import KafkaConfig
from cdc_sink.consumer import compression
from cdc_synth import synth
from cdc_synth.demo import endpoints

PARTITIONS = 8
DEFAULTS = KafkaConfig()


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def produce(bootstrap: str, topic: str, events: int, fmt: str) -> float:
    """Write the events; the mean value size in bytes."""
    encoder: Any
    if fmt == "json":
        encoder = synth.JsonEncoder()
    elif fmt == "json-schemaless":
        encoder = synth.SchemalessJsonEncoder()
    else:
        encoder = synth.AvroEncoder({t: (2 * n + 1, 2 * n + 2) for n, t in enumerate(synth.TABLES)})
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all"})
    size = 0
    for event in synth.generate(events, 1, start_us=1):
        key, value = encoder.encode(event)
        size += len(value)
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.1)
        producer.poll(0)
    producer.flush()
    return size / events


async def aiokafka_cpu(bootstrap: str, topic: str, events: int, **options: Any) -> float:
    """CPU seconds per record of aiokafka reading the topic to its end."""
    settings = {
        "fetch_max_bytes": DEFAULTS.fetch_max_bytes,
        "max_partition_fetch_bytes": DEFAULTS.max_partition_fetch_bytes,
        "fetch_min_bytes": DEFAULTS.fetch_min_bytes,
        "fetch_max_wait_ms": DEFAULTS.fetch_max_wait_ms,
    } | options
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **settings,
    )
    await consumer.start()
    try:
        got, first, began = 0, 0, 0.0
        while got < events:
            fetched = await compression.within_fetch_budget(consumer.getmany(timeout_ms=100))
            for records in fetched.values():
                for record in records:
                    _ = record.key, record.value, record.offset
                got += len(records)
            if not first and got:
                first, began = got, cpu_s()
        return (cpu_s() - began) / max(1, got - first)
    finally:
        await consumer.stop()


def librdkafka_cpu(bootstrap: str, topic: str, events: int, *, check_crcs: bool) -> float:
    """CPU seconds per record of confluent-kafka's consumer reading the topic to its end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-consumer-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.min.bytes": DEFAULTS.fetch_min_bytes,
            "fetch.wait.max.ms": DEFAULTS.fetch_max_wait_ms,
            "max.partition.fetch.bytes": DEFAULTS.max_partition_fetch_bytes,
            "check.crcs": check_crcs,
        }
    )
    consumer.subscribe([topic])
    try:
        got, first, began = 0, 0, 0.0
        while got < events:
            messages = consumer.consume(num_messages=1000, timeout=0.1)
            for message in messages:
                if message.error():
                    raise RuntimeError(message.error())
                _ = message.key(), message.value(), message.offset()
            got += len(messages)
            if not first and got:
                first, began = got, cpu_s()
        return (cpu_s() - began) / max(1, got - first)
    finally:
        consumer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--format", choices=("json", "json-schemaless", "avro"), default="json")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bootstrap = endpoints()["CDC_KAFKA__BOOTSTRAP_SERVERS"]
    compression.install(DEFAULTS.max_inflated_batch_bytes)
    topic = f"bench-consumer-{args.format}-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result()
    n = args.events
    clients: list[tuple[str, Callable[[], float]]] = [
        ("aiokafka, check_crcs=True", lambda: asyncio.run(aiokafka_cpu(bootstrap, topic, n))),
        (
            "aiokafka, check_crcs=False",
            lambda: asyncio.run(aiokafka_cpu(bootstrap, topic, n, check_crcs=False)),
        ),
        (
            "aiokafka, 1 MiB per partition",
            lambda: asyncio.run(
                aiokafka_cpu(bootstrap, topic, n, max_partition_fetch_bytes=1_048_576)
            ),
        ),
        (
            "librdkafka, check.crcs=true",
            lambda: librdkafka_cpu(bootstrap, topic, n, check_crcs=True),
        ),
        (
            "librdkafka, check.crcs=false",
            lambda: librdkafka_cpu(bootstrap, topic, n, check_crcs=False),
        ),
    ]
    try:
        size = produce(bootstrap, topic, n, args.format)
        print(f"{args.format}: {n} records, {size:.0f} bytes per value", flush=True)
        for _ in range(args.rounds):
            for name, run in clients:
                print(f"  {name:32s} {run() * 1e6:6.2f} us CPU per record", flush=True)
    finally:
        admin.delete_topics([topic])[topic].result()


if __name__ == "__main__":
    main()
