"""The fetch pipeline of one assignment, on its own: what it reads, how it cuts chunks, when it
hands them over and how it is closed (the consumer and the preparer are stand-ins)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from cdc_sink.consumer.ownership import Owned
from cdc_sink.consumer.pipeline import FetchPipeline
from cdc_sink.consumer.prepare import Prepared
from cdc_sink.errors import FatalError

A, B, C = (TopicPartition("cdc-events-t", n) for n in range(3))


def record(tp: TopicPartition, offset: int) -> Any:
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, b"k", b"v", None, 1, 1, [])


class Consumer:
    """Hands out the fetches it is given, one per getmany, and then waits."""

    def __init__(self, *fetches: dict[TopicPartition, list[Any]]) -> None:
        self.fetches = list(fetches)
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.assigned = {A, B, C}
        self.cancelled = asyncio.Event()

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def getmany(self, timeout_ms: int) -> dict[TopicPartition, list[Any]]:
        if self.fetches:
            return self.fetches.pop(0)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")


class Preparer:
    async def prepare(self, records: list[Any], busy: Any) -> Prepared:
        prepared = Prepared(list(records))
        for r in records:
            prepared.first.setdefault(TopicPartition(r.topic, r.partition), r.offset)
        return prepared


class Applied:
    """The `apply` the pipeline is handed: records each chunk; the n-th waits for `gates[n]`
    and raises `failures[n]` if given."""

    def __init__(self) -> None:
        self.chunks: list[list[tuple[int, int]]] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.failures: dict[int, Exception] = {}

    async def __call__(self, prepared: Prepared) -> None:
        n = len(self.chunks)
        self.chunks.append([(r.partition, r.offset) for r in prepared.records])
        if n in self.gates:
            await self.gates[n].wait()
        if n in self.failures:
            raise self.failures[n]


def pipeline(
    consumer: Consumer,
    applied: Applied,
    *,
    owned: dict[TopicPartition, Owned] | None = None,
    paused: set[TopicPartition] | None = None,
    batch_size: int = 3,
) -> FetchPipeline:
    return FetchPipeline(
        consumer,  # type: ignore[arg-type]
        Preparer(),  # type: ignore[arg-type]
        applied,
        owned=owned if owned is not None else {A: Owned(1, 0), B: Owned(1, 0)},
        paused=paused or set(),
        batch_size=batch_size,
        linger_ms=0,
        stopping=asyncio.Event(),
    )


async def steps(fetch: FetchPipeline, n: int) -> None:
    for _ in range(n):
        await asyncio.wait_for(fetch.step(), 5)


@pytest.fixture
def applied() -> Applied:
    return Applied()


async def test_opening_seeks_each_owned_assigned_partition_to_its_checkpoint(
    applied: Applied,
) -> None:
    """A new pipeline reads every partition it owns and the group assigned from its checkpoint,
    and leaves the others alone."""
    consumer = Consumer()
    consumer.assigned = {A, C}
    pipeline(consumer, applied, owned={A: Owned(1, 7), B: Owned(1, 3)})
    assert consumer.seeks == [(A, 7)]


async def test_chunks_are_cut_at_the_batch_size_and_applied_in_order(applied: Applied) -> None:
    """Fetched records become chunks of at most batch_size, each partition's records in offset
    order, applied one after the other."""
    consumer = Consumer({A: [record(A, o) for o in range(4)], B: [record(B, 0)]})
    fetch = pipeline(consumer, applied)
    await steps(fetch, 3)
    await fetch.close()
    assert applied.chunks == [[(0, 0), (0, 1), (0, 2)], [(0, 3), (1, 0)]]


async def test_records_not_ours_or_already_taken_are_dropped(applied: Applied) -> None:
    """Records of a partition not owned or paused, before its checkpoint, or taken from an
    earlier fetch, are not applied."""
    consumer = Consumer(
        {A: [record(A, 4), record(A, 5)], B: [record(B, 0)], C: [record(C, 0)]},
        {A: [record(A, 5), record(A, 6)]},
    )
    fetch = pipeline(
        consumer, applied, owned={A: Owned(1, 5), B: Owned(1, 0)}, paused={B}, batch_size=10
    )
    await steps(fetch, 3)
    await fetch.close()
    assert applied.chunks == [[(0, 5)], [(0, 6)]]


async def test_a_stale_pipeline_takes_nothing_more(applied: Applied) -> None:
    """Once the worker marks it stale (the assignment or positions changed), what it fetched
    is not prepared or applied: a new pipeline reads it again."""
    consumer = Consumer({A: [record(A, 0)]})
    fetch = pipeline(consumer, applied)
    fetch.stale = True
    await steps(fetch, 1)
    await fetch.close()
    assert applied.chunks == []


async def test_closing_drops_the_prepared_chunk_and_raises_the_failure_in_flight(
    applied: Applied,
) -> None:
    """Close drops the chunk prepared ahead (it is read again) and waits for the one in flight,
    whose failure it raises."""
    consumer = Consumer({A: [record(A, o) for o in range(5)]})
    applied.gates[0] = asyncio.Event()
    applied.failures[0] = FatalError("the chunk failed", stage="write")
    fetch = pipeline(consumer, applied)
    await steps(fetch, 1)  # 0-2 in flight, 3-4 prepared
    assert fetch.applying
    closing = asyncio.ensure_future(fetch.close())
    await asyncio.sleep(0.01)
    assert not closing.done()  # waits for the chunk in flight
    applied.gates[0].set()
    with pytest.raises(FatalError, match="the chunk failed"):
        await asyncio.wait_for(closing, 5)
    assert applied.chunks == [[(0, 0), (0, 1), (0, 2)]]
    assert not fetch.applying


async def test_closing_cancels_the_outstanding_fetch(applied: Applied) -> None:
    """A fetch still waiting for the broker when the pipeline is closed is cancelled."""
    consumer = Consumer({A: [record(A, o) for o in range(3)]})
    applied.gates[0] = asyncio.Event()
    fetch = pipeline(consumer, applied)
    await steps(fetch, 1)  # 0-2 in flight
    stepping = asyncio.ensure_future(fetch.step())  # fetches again, and waits
    await asyncio.sleep(0.01)
    applied.gates[0].set()
    await asyncio.wait_for(stepping, 5)  # the chunk in flight is done, the fetch is not
    await asyncio.wait_for(fetch.close(), 5)
    assert consumer.cancelled.is_set()
