"""Bounded inflation of compressed Kafka record batches (an adapter over aiokafka's internals).

aiokafka inflates a compressed record batch whole before reading its first record, with no
bound: a batch of a few KiB of zstd, inside every fetch limit, can become gigabytes. `install`
puts bounded versions in aiokafka's place, checked against aiokafka 0.14 (it raises if the
names it replaces are gone, and so does a unit test):

- the codec functions aiokafka's record batches call: gzip, lz4 and zstd inflate into a buffer
  capped at the limit, snappy checks the length its blocks declare before inflating them; past
  the limit they raise `InflateRefused` instead of allocating;
- the fetcher's `MemoryRecords` (one partition's fetched bytes): a batch that cannot be
  inflated hands over, instead of its records, one record whose value is an `UninflatedBatch`
  and whose offset is the batch's last (so the consumer's position moves past it); and, within
  `within_fetch_budget`, batches stop being handed over once those inflated reach the limit
  (the rest is fetched again), so one fetch inflates at most about twice the limit.
"""

from __future__ import annotations

import contextvars
import importlib
import mmap
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import cramjam
from aiokafka.consumer import fetcher
from aiokafka.record.memory_records import MemoryRecords

from cdc_sink.errors import BatchInflateError

T = TypeVar("T")

SETTING = "CDC_KAFKA__MAX_INFLATED_BATCH_BYTES"
# Outputs up to this size are inflated into one reused buffer (fresh memory costs a page fault
# per page); larger ones into a fresh buffer capped at the limit.
_SCRATCH_BYTES = 1024 * 1024
_XERIAL_HEADER = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01"  # Java's framed snappy
_BLOCK_SIZE = struct.Struct(">i")


class InflateRefused(Exception):
    """A compressed batch inflates beyond the limit, or is not valid for its codec; the message
    completes "record batch at offsets …"."""

    def __init__(self, reason: str, data: Any) -> None:
        super().__init__(reason)
        self.compressed_bytes = len(memoryview(data))


@dataclass(frozen=True)
class UninflatedBatch:
    """Stands, as a record's value, for a compressed record batch that was not inflated: none
    of its records was read. The record carrying it has the batch's last offset."""

    first_offset: int
    last_offset: int
    reason: str
    compressed_bytes: int

    def __len__(self) -> int:
        return self.compressed_bytes  # aiokafka records len(value) as the value's size

    def error(self) -> BatchInflateError:
        return BatchInflateError(
            f"record batch at offsets {self.first_offset}..{self.last_offset} {self.reason}; "
            "none of its records was read"
        )


_limit = 0  # set by `install`
_scratch = bytearray()


@dataclass
class _FetchBudget:
    inflated: int = 0


_budget: contextvars.ContextVar[_FetchBudget | None] = contextvars.ContextVar(
    "cdc_inflate_budget", default=None
)


async def within_fetch_budget(fetch: Awaitable[T]) -> T:
    """Await `fetch` (a consumer's `getmany`) as one fetch: once its compressed batches have
    inflated the limit, it hands over no further batch (they are fetched again next time)."""
    token = _budget.set(_FetchBudget())
    try:
        return await fetch
    finally:
        _budget.reset(token)


def _inflated(size: int) -> None:
    budget = _budget.get()
    if budget is not None:
        budget.inflated += size


# --- the codecs ------------------------------------------------------------------------------


def _capped(codec: str, inflate_into: Callable[[Any, Any], int]) -> Callable[[Any], Any]:
    """A decoder for a codec whose `inflate_into(data, output)` stops with an error when the
    output buffer is full."""

    def inflate(data: Any) -> Any:
        try:
            size = inflate_into(data, _scratch)
        except cramjam.DecompressionError:
            pass  # larger than the reused buffer (or not valid): decide below
        else:
            _inflated(size)
            return bytes(memoryview(_scratch)[:size])
        out = mmap.mmap(-1, _limit + 1)  # pages are only taken as they are written
        out[_limit] = 1  # overwritten only by output beyond the limit
        try:
            size = inflate_into(data, out)
        except cramjam.DecompressionError as exc:
            if out[_limit] == 1:  # (output that happens to hold 1 there only changes the message)
                raise InflateRefused(f"is not valid {codec} ({exc})", data) from exc
            size = _limit + 1
        if size > _limit:
            raise InflateRefused(_beyond(codec, data), data)
        _inflated(size)
        return memoryview(out)[:size]

    return inflate


def _beyond(codec: str, data: Any) -> str:
    return (
        f"({codec}, {len(memoryview(data))} bytes compressed) inflates beyond {SETTING} "
        f"({_limit} bytes)"
    )


def _snappy(data: Any) -> bytes:
    """Raw snappy or Java's framed (xerial) snappy, each block's declared length checked
    before it is inflated."""
    view = memoryview(data)
    blocks = []
    if view[: len(_XERIAL_HEADER)] == _XERIAL_HEADER:
        pos = len(_XERIAL_HEADER)
        while pos < len(view):
            (size,) = _BLOCK_SIZE.unpack_from(view, pos)
            blocks.append(view[pos + 4 : pos + 4 + size])
            pos += 4 + size
    else:
        blocks.append(view)
    total = 0
    parts = []
    try:
        for block in blocks:
            total += cramjam.snappy.decompress_raw_len(block)
            if total > _limit:
                raise InflateRefused(_beyond("snappy", data), data)
            parts.append(cramjam.snappy.decompress_raw(block))
    except cramjam.DecompressionError as exc:
        raise InflateRefused(f"is not valid snappy ({exc})", data) from exc
    _inflated(total)
    return b"".join(parts)


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "gzip_decode": _capped("gzip", cramjam.gzip.decompress_into),
    "lz4_decode": _capped("lz4", cramjam.lz4.decompress_into),
    "zstd_decode": _capped("zstd", cramjam.zstd.decompress_into),
    "snappy_decode": _snappy,
}

# Where aiokafka's record batches look up their decoders (the C extension and pure Python).
_CURRENT = ("gzip_decode", "snappy_decode", "lz4_decode", "zstd_decode")
_LEGACY = ("gzip_decode", "snappy_decode", "lz4_decode")  # message formats 0 and 1
_RECORD_MODULES = {
    "aiokafka.record.default_records": _CURRENT,
    "aiokafka.record._crecords.default_records": _CURRENT,
    "aiokafka.record.legacy_records": _LEGACY,
    "aiokafka.record._crecords.legacy_records": _LEGACY,
}


# --- the fetcher -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _StandIn:
    """What aiokafka's fetcher reads of a record, for a batch that was not inflated."""

    offset: int
    timestamp: int | None
    value: UninflatedBatch
    timestamp_type: int | None = None
    key: None = None
    headers: tuple[()] = ()
    checksum: None = None


class _GuardedBatch:
    """A compressed record batch: its own records, or one stand-in if it cannot be inflated."""

    def __init__(self, batch: Any) -> None:
        self._batch = batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __iter__(self) -> Iterator[Any]:
        try:
            records = iter(self._batch)  # the current format inflates here ...
            record = next(records, None)  # ... the legacy ones at their first record
        except InflateRefused as refused:
            yield self._stand_in(refused)
            return
        while record is not None:  # not `yield from`: aiokafka's batches iterate only once
            yield record
            record = next(records, None)

    def _stand_in(self, refused: InflateRefused) -> _StandIn:
        batch = self._batch
        last = batch.next_offset - 1
        first = getattr(batch, "base_offset", last)  # legacy batches do not say
        return _StandIn(
            offset=last,
            timestamp=getattr(batch, "max_timestamp", None),
            value=UninflatedBatch(first, last, str(refused), refused.compressed_bytes),
        )


class _BoundedRecords:
    """aiokafka's MemoryRecords for one partition's fetched bytes, with guarded batches."""

    def __init__(self, data: bytes) -> None:
        self._records = MemoryRecords(data)

    def size_in_bytes(self) -> int:
        return int(self._records.size_in_bytes())

    def has_next(self) -> bool:
        budget = _budget.get()
        if budget is not None and budget.inflated >= _limit:
            return False  # this fetch has inflated enough: the rest is fetched again
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        batch = self._records.next_batch()
        if batch is None or batch.is_control_batch or getattr(batch, "compression_type", 1) == 0:
            return batch
        return _GuardedBatch(batch)


def _modules() -> dict[ModuleType, tuple[str, ...]]:
    found = {}
    for name, decoders in _RECORD_MODULES.items():
        try:
            found[importlib.import_module(name)] = decoders
        except ImportError:  # the C extension is optional
            if "._crecords." not in name:
                raise
    return found


def install(max_inflated_bytes: int) -> int:
    """Bound inflation in this process to `max_inflated_bytes` per batch (idempotent; the last
    call's limit applies); return the limit replaced (0: none). Raises RuntimeError if
    aiokafka's internals are not as expected."""
    global _limit, _scratch
    modules = _modules()
    for module, names in modules.items():
        missing = [n for n in names if not callable(getattr(module, n, None))]
        if missing:
            raise RuntimeError(
                f"{module.__name__} has no {', '.join(missing)}: this aiokafka version inflates "
                "record batches differently; cdc_sink.consumer.compression was checked against 0.14"
            )
    if not (
        fetcher.MemoryRecords in (MemoryRecords, _BoundedRecords)
        and callable(getattr(fetcher.PartitionRecords, "_unpack_records", None))
    ):
        raise RuntimeError(
            "aiokafka's fetcher no longer reads batches through MemoryRecords: "
            "cdc_sink.consumer.compression was checked against aiokafka 0.14"
        )
    before, _limit = _limit, max_inflated_bytes
    _scratch = bytearray(min(_SCRATCH_BYTES, max_inflated_bytes))
    for module, names in modules.items():
        for name in names:
            setattr(module, name, _DECODERS[name])
    fetcher.MemoryRecords = _BoundedRecords
    return before
