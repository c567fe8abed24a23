"""The benchmark's two producers (aiokafka, librdkafka) land the same events alike."""

from __future__ import annotations

from collections.abc import Callable

from cdc_synth import synth
from tests.support.stack import Endpoints


async def test_librdkafka_producer_partitions_like_the_java_client(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """Same keys, same partitions (murmur2, as Kafka's Java client and aiokafka); every event
    acknowledged once, in order within its partition, timestamped with its send time."""
    events = synth.Generator(7, start_us=1_700_000_000_000_000).take(600)
    by_aiokafka = await synth.produce(
        stack.kafka, events, "json", topic_prefix=unique("cdc-events-viaaio") + "-"
    )
    native_prefix = unique("cdc-events-vialibrdkafka") + "-"
    seen: list[int] = []
    by_librdkafka = await synth.produce(
        stack.kafka,
        events,
        "json",
        rate=2000,
        topic_prefix=native_prefix,
        on_sent=seen.append,
        client="librdkafka",
    )

    assert len(by_librdkafka) == len(events)
    assert seen[-1] == len(events)
    assert [s.partition for s in by_librdkafka] == [s.partition for s in by_aiokafka]
    assert [s.topic for s in by_librdkafka] == [
        synth.topic_for(e.table, native_prefix) for e in events
    ]
    per_partition: dict[tuple[str, int], list[int]] = {}
    for sent in by_librdkafka:
        per_partition.setdefault((sent.topic, sent.partition), []).append(sent.offset)
        assert abs(sent.timestamp_ms / 1000 - sent.sent_at) < 0.01
    for offsets in per_partition.values():
        assert offsets == list(range(len(offsets)))
