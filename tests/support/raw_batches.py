"""Record batches built by hand and produced as they are (a producer would compress in memory
what it sends, and never sends what a hostile one would)."""

from __future__ import annotations

import struct

import cramjam
from aiokafka import AIOKafkaClient, TopicPartition
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.util import calc_crc32c, encode_varint

ZSTD = 4


def _varint(value: int) -> bytes:
    out = bytearray()
    encode_varint(value, out.append)
    return bytes(out)


def zstd_batch_of_zeros(records: int, value_bytes: int, timestamp_ms: int) -> bytes:
    """A record batch (format 2) of `records` records whose values are `value_bytes` zero
    bytes each, zstd-compressed as a stream: a GiB of records fits in some tens of KiB and is
    never held in memory here."""
    compressor = cramjam.zstd.Compressor(level=1)
    zeros = bytes(min(value_bytes, 8 << 20))
    for delta in range(records):
        # attributes, timestamp delta, offset delta, no key, the value's length
        head = b"\x00" + _varint(0) + _varint(delta) + _varint(-1) + _varint(value_bytes)
        compressor.compress(_varint(len(head) + value_bytes + 1) + head)
        left = value_bytes
        while left:
            chunk = zeros if left >= len(zeros) else zeros[:left]
            compressor.compress(chunk)
            left -= len(chunk)
        compressor.compress(_varint(0))  # no headers
    compressed = bytes(compressor.finish())
    # attributes, last offset delta, first/max timestamp, producer id/epoch, base sequence, count
    covered = struct.pack(
        ">hiqqqhii", ZSTD, records - 1, timestamp_ms, timestamp_ms, -1, -1, -1, records
    )
    covered += compressed
    after_length = struct.pack(">ibI", -1, 2, calc_crc32c(covered)) + covered
    return struct.pack(">qi", 0, len(after_length)) + after_length


async def produce_batch(bootstrap: str, topic: str, partition: int, batch: bytes) -> int:
    """Append one record batch to a partition as it is (acks=all); return its base offset."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        client.add_topic(topic)
        await client.force_metadata_update()
        leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        request = ProduceRequest(
            transactional_id=None,
            required_acks=-1,
            timeout=60_000,
            topics=[(topic, [(partition, batch)])],
        )
        response = await client.send(leader, request)
    finally:
        await client.close()
    [(_, [(_, error_code, offset, *_)])] = response.topics
    assert error_code == 0, f"the broker refused the batch: error code {error_code}"
    return int(offset)
