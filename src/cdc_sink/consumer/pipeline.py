"""The fetch pipeline of one assignment: a fetch always outstanding, the next chunk prepared
while the one in flight is applied. The worker opens one whenever the partitions it reads, or
their positions, change (an assignment, a revocation, a pause, a resume, being fenced) and
closes the one before: its chunk in flight finishes, what it read or prepared ahead is dropped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Mapping, Set
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from cdc_sink.consumer import compression
from cdc_sink.consumer.ownership import Owned
from cdc_sink.consumer.prepare import Prepared, Preparer


class FetchPipeline:
    """Reads the partitions in `owned` (not `paused`) from their checkpoints into chunks of at
    most `batch_size` records, each partition's records contiguous and in offset order, and
    hands each chunk to `apply` once the one before is applied. Once `stale` is set it takes
    nothing more; the worker closes it."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        preparer: Preparer,
        apply: Callable[[Prepared], Coroutine[Any, Any, None]],
        *,
        owned: Mapping[TopicPartition, Owned],
        paused: Set[TopicPartition],
        batch_size: int,
        linger_ms: int,
        stopping: asyncio.Event,
    ) -> None:
        self._consumer = consumer
        self._preparer = preparer
        self._apply = apply
        self._owned = owned
        self._paused = paused
        self._batch_size = batch_size
        self._linger_ms = linger_ms
        self._stopping = stopping
        self.stale = False
        self._fetching: asyncio.Future[dict[TopicPartition, list[Any]]] | None = None
        self._in_flight: asyncio.Task[None] | None = None
        # The next chunk's prepared pieces, joined once when it is handed over.
        self._next: list[Prepared] = []
        self._taken: dict[TopicPartition, int] = {}  # each partition's next offset to take
        assignment = consumer.assignment()
        for tp, owned_tp in owned.items():
            if tp in assignment:
                consumer.seek(tp, owned_tp.next_offset)

    @property
    def applying(self) -> bool:
        """A chunk is in flight."""
        return self._in_flight is not None

    async def step(self) -> None:
        """Wait for the fetch or the chunk in flight, whichever ends first, and move on: take
        what was fetched, start the next chunk once the one in flight is done. The failure of
        the chunk in flight (FatalError, Stopping) is raised here."""
        if self._fetching is None:
            # No max_records: with it, aiokafka serves one partition's buffer at a time and
            # waits a fetch round trip between calls. Chunks are cut in `_take`.
            self._fetching = asyncio.ensure_future(
                compression.within_fetch_budget(self._consumer.getmany(timeout_ms=self._linger_ms))
            )
        waiting: set[asyncio.Future[Any]] = {self._fetching}
        if self._in_flight is not None:
            waiting.add(self._in_flight)
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if self._in_flight is not None and self._in_flight.done():
            await self._settle()
        if self._fetching.done():
            fetched, self._fetching = self._fetching.result(), None
            if not self.stale:  # else fetched before a seek: read again after it
                await self._take(fetched)
        if self._in_flight is None and self._next and not self.stale:
            self._submit(Prepared.joined(self._next))
            self._next = []

    async def close(self) -> None:
        """Cancel the fetch, drop the prepared chunk (it is read again) and wait for the one in
        flight; its failure is raised here."""
        fetching, self._fetching = self._fetching, None
        if fetching is not None and not fetching.done():
            fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError, KafkaError):
                await fetching
        elif fetching is not None and not fetching.cancelled():
            fetching.exception()  # retrieved, so asyncio does not report it
        self._next = []
        await self._settle()

    async def _take(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        """Prepare fetched records into the next chunk, handing each full chunk over as soon
        as the one in flight is done. Records of a partition not ours are dropped (a claim
        seeks it to its checkpoint)."""
        records: list[Any] = []
        for tp, batch in fetched.items():
            owned = self._owned.get(tp)
            if owned is None or tp in self._paused:
                continue
            start = self._taken.get(tp, owned.next_offset)
            fresh = [r for r in batch if r.offset >= start]
            if fresh:
                self._taken[tp] = fresh[-1].offset + 1
                records.extend(fresh)
        size = self._batch_size
        while records and not self._stopping.is_set() and not self.stale:
            room = size - sum(len(piece.records) for piece in self._next)
            chunk, records = records[:room], records[room:]
            self._next.append(await self._preparer.prepare(chunk, lambda: self.applying))
            if len(chunk) == room:  # the next chunk is full
                await self._settle()
                if self._went_stale():  # the chunk in flight paused a partition
                    return
                self._submit(Prepared.joined(self._next))
                self._next = []

    def _went_stale(self) -> bool:
        return self.stale  # a method, so type checkers do not assume it unchanged by awaits

    def _submit(self, prepared: Prepared) -> None:
        assert self._in_flight is None
        self._in_flight = asyncio.create_task(self._apply(prepared))

    async def _settle(self) -> None:
        task, self._in_flight = self._in_flight, None
        if task is not None:
            await task
