"""Bounded inflation of compressed record batches, through aiokafka's own record reading."""

from __future__ import annotations

import datetime as dt
import gzip
import importlib
import struct
from collections.abc import Callable, Iterator
from typing import Any

import cramjam
import pytest
from aiokafka import TopicPartition
from aiokafka import codec as aiokafka_codec
from aiokafka.consumer import fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from cdc_sink.config import KafkaConfig
from cdc_sink.consumer import compression
from cdc_sink.consumer.compression import InflateRefused, UninflatedBatch
from cdc_sink.dlq.letters import DeadLetter

LIMIT = 2 * 1024 * 1024
CODECS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
ENCODERS = {
    "gzip": aiokafka_codec.gzip_encode,
    "snappy": aiokafka_codec.snappy_encode,  # Java's framed form, as the broker writes it
    "lz4": aiokafka_codec.lz4_encode,
    "zstd": aiokafka_codec.zstd_encode,
}


@pytest.fixture(autouse=True)
def limit() -> Iterator[int]:
    """aiokafka bounded at LIMIT for the test, then at what it was before (or the default)."""
    before = compression.install(LIMIT)
    yield LIMIT
    compression.install(before or KafkaConfig().max_inflated_batch_bytes)


def decoder(codec: str) -> Callable[[bytes], Any]:
    """The function aiokafka's record batches (the C extension's) inflate `codec` with."""
    module = importlib.import_module("aiokafka.record._crecords.default_records")
    found: Callable[[bytes], Any] = getattr(module, f"{codec}_decode")
    return found


def payload(size: int) -> bytes:
    """Compressible but not trivial bytes."""
    return (b"cdc-sink %08d " * (size // 18 + 1) % tuple(range(size // 18 + 1)))[:size]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("size", [1, 1000, 1024 * 1024 + 7, LIMIT])
def test_each_codec_inflates_what_aiokafka_would(codec: str, size: int) -> None:
    """Up to the limit, the bounded decoders give exactly aiokafka's own output."""
    data = ENCODERS[codec](payload(size))
    assert bytes(decoder(codec)(data)) == aiokafka_codec.__dict__[f"{codec}_decode"](data)


@pytest.mark.parametrize("codec", CODECS)
def test_output_beyond_the_limit_is_refused_naming_the_setting(codec: str) -> None:
    """One byte over the limit is refused, saying which setting bounds it."""
    with pytest.raises(InflateRefused, match=f"{codec}.*CDC_KAFKA__MAX_INFLATED_BATCH_BYTES"):
        decoder(codec)(ENCODERS[codec](bytes(LIMIT + 1)))


@pytest.mark.parametrize("codec", ["gzip", "lz4", "zstd"])
def test_a_flood_of_zeros_is_refused_after_writing_at_most_the_limit(codec: str) -> None:
    """A flood of zeros in a few KiB stops at the limit: nothing of its size is allocated."""
    compressor = getattr(cramjam, codec).Compressor()
    chunk = bytes(16 * 1024 * 1024)
    for _ in range(16):  # 256 MiB
        compressor.compress(chunk)
    data = bytes(compressor.finish())
    assert len(data) < 2 * 1024 * 1024
    with pytest.raises(InflateRefused, match="inflates beyond"):
        decoder(codec)(data)


def test_snappy_refuses_blocks_declaring_more_than_the_limit_before_inflating() -> None:
    """A raw snappy block says its length first; one declaring more than the limit is refused
    before anything is allocated."""
    data = bytes(cramjam.snappy.compress_raw(bytes(LIMIT + 1)))
    with pytest.raises(InflateRefused, match="snappy"):
        decoder("snappy")(data)


@pytest.mark.parametrize("codec", CODECS)
def test_bytes_that_are_not_the_codec_are_refused_as_such(codec: str) -> None:
    """Garbage is not valid for its codec (and is not reported as too large)."""
    with pytest.raises(InflateRefused, match=f"is not valid {codec}"):
        decoder(codec)(b"\x00\x01 not compressed at all " * 3)


def batch(codec: str, base_offset: int, values: list[bytes]) -> bytes:
    """A record batch of the current format, compressed with `codec`."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=CODECS.get(codec, 0),
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 30,
    )
    for i, value in enumerate(values):
        builder.append(i, timestamp=1_700_000_000_000 + i, key=b"k", value=value, headers=[])
    data = builder.build()
    struct.pack_into(">q", data, 0, base_offset)  # the broker's part; not under the CRC
    return bytes(data)


def partition_records(data: bytes, fetch_offset: int = 0) -> fetcher.PartitionRecords:
    """What aiokafka's fetcher makes of one partition's fetched bytes."""
    return fetcher.PartitionRecords(
        TopicPartition("t", 0),
        fetcher.MemoryRecords(data),
        [],
        fetch_offset,
        None,
        None,
        True,
        fetcher.READ_UNCOMMITTED,
    )


def test_aiokafka_reads_record_batches_through_the_bounded_decoders() -> None:
    """aiokafka still looks up its decoders and MemoryRecords where `install` replaced them
    (fails when a new aiokafka version moves them; see cdc_sink.consumer.compression)."""
    for name, decoders in compression._RECORD_MODULES.items():
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attribute in decoders:
            assert getattr(module, attribute) is compression._DECODERS[attribute]
    assert fetcher.MemoryRecords is compression._BoundedRecords


@pytest.mark.parametrize("codec", CODECS)
def test_a_batch_beyond_the_limit_becomes_one_record_standing_for_it(codec: str) -> None:
    """The consumer hands over one stand-in (offset: the batch's last) for a batch it cannot
    inflate, then the records after it, and its position moves past both."""
    data = batch(codec, 10, [b"a", bytes(LIMIT), b"c"]) + batch("none", 13, [b"d", b"e"])
    records = partition_records(data, fetch_offset=10)
    got = list(records)
    assert [r.offset for r in got] == [12, 13, 14]
    stand_in = got[0].value
    assert isinstance(stand_in, UninflatedBatch)
    assert (stand_in.first_offset, stand_in.last_offset) == (10, 12)
    assert got[0].key is None
    assert got[0].headers == ()
    assert [r.value for r in got[1:]] == [b"d", b"e"]
    assert records.next_fetch_offset == 15
    message = str(stand_in.error())
    assert message.startswith(f"record batch at offsets 10..12 ({codec}, ")
    assert "inflates beyond CDC_KAFKA__MAX_INFLATED_BATCH_BYTES (2097152 bytes)" in message


async def test_a_fetch_takes_no_more_batches_once_those_it_inflated_reach_the_limit() -> None:
    """Within one fetch, batches stop being handed over once the inflated ones reach the limit;
    the position stays at the first batch not handed over, so it is fetched again."""
    big = payload(LIMIT * 6 // 10)
    batches = [batch("zstd", offset, [big]) for offset in (0, 1, 2)]
    records = partition_records(b"".join(batches))

    async def fetch() -> list[int]:
        return [r.offset for r in records]

    assert await compression.within_fetch_budget(fetch()) == [0, 1]
    assert records.next_fetch_offset == 2
    again = partition_records(batches[2], fetch_offset=2)
    assert [r.offset for r in again] == [2]  # outside a fetch budget, only the batch limit


def test_a_letter_for_a_batch_counts_its_offsets_for_the_dlq_limit() -> None:
    """A dead letter standing for a batch covers the batch's offsets, at most a window of them."""
    letter = DeadLetter(
        topic="t",
        partition=0,
        offset=1_000_000,
        timestamp_ms=None,
        key=None,
        value=None,
        headers=(),
        error_class="BatchInflateError",
        message="",
        stage="fetch",
        schema_id=None,
        failed_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        first_offset=10,
    )
    assert letter.offsets(1000) == range(999_001, 1_000_001)
    assert DeadLetter(**{**letter.__dict__, "first_offset": None}).offsets(1000) == range(
        1_000_000, 1_000_001
    )


def test_gzip_with_several_members_inflates_whole() -> None:
    """Concatenated gzip members (which aiokafka reads) are read whole."""
    data = gzip.compress(b"first ") + gzip.compress(b"second")
    assert bytes(decoder("gzip")(data)) == b"first second"
