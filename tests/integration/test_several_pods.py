"""Workers of one consumer group seen as pods: readiness of an idle one, and a DLQ resume
that reaches the pod holding the paused partition whichever pod the request reached."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cdc_sink.app import SinkApp
from cdc_sink.config import load_config
from tests.integration.test_dlq import good_mutation, poison
from tests.support.names import Unique
from tests.support.pipeline import (
    create_cassandra_model_table,
    create_topic,
    http_get,
    produce_positions,
    schemaless_record,
    sink_env,
)
from tests.support.stack import Endpoints


@asynccontextmanager
async def pods(env: dict[str, str], count: int) -> AsyncIterator[list[SinkApp]]:
    """`count` workers of one group, running until the block ends."""
    workers = [SinkApp(load_config(env)) for _ in range(count)]
    tasks = [asyncio.create_task(worker.run()) for worker in workers]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 90)


async def test_a_worker_holding_no_partition_is_ready(stack: Endpoints, unique: Unique) -> None:
    """Two workers of one group on a one-partition topic: once one holds the partition, both
    answer /ready 200, the idle one with no partitions (it is joined, PostgreSQL answers),
    so a pod beyond the partition count does not stall a rolling update."""
    topic = unique("cdc-events-idle")
    await create_topic(stack.kafka, topic, partitions=1)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=unique.schema("idle"))
    async with pods(env, 2) as workers:
        async with asyncio.timeout(90):  # both joined, one holding the partition
            while True:
                await asyncio.sleep(0.2)
                if any(w.probes is None for w in workers):
                    continue
                answers = [
                    await asyncio.to_thread(http_get, w.probes.port, "/ready")  # type: ignore[union-attr]
                    for w in workers
                ]
                states = [(status, json.loads(body)) for status, body in answers]
                if all(detail["group"] == "joined" for _, detail in states) and sorted(
                    detail["assigned_partitions"] for _, detail in states
                ) == [0, 1]:
                    break
        assert [status for status, _ in states] == [200, 200]
        assert {"postgres": True, "group": "joined", "assigned_partitions": 0} in [
            detail for _, detail in states
        ]


async def test_a_resume_reaches_the_pod_holding_the_paused_partition(
    stack: Endpoints, unique: Unique
) -> None:
    """Two workers each holding one partition, each paused by a run of bad records past
    the DLQ share: one POST /dlq/resume to the first pod resumes both partitions (the
    second pod acts on the request kept in PostgreSQL within its poll interval), so both
    re-check from their checkpoints and pause again."""
    keyspace, topic = unique.keyspace("ks"), unique("cdc-events-resume")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, partitions=2)
    good = iter(schemaless_record(good_mutation(i), keyspace) for i in range(10_000))
    for partition in range(2):
        bad = [poison("undecodable", j, keyspace) for j in range(150)]
        await produce_positions(stack.kafka, topic, [next(good) for _ in range(20)], partition)
        await produce_positions(stack.kafka, topic, bad, partition)
    env = sink_env(
        stack,
        topic=topic,
        group=unique("g"),
        schema=unique.schema("resume"),
        dlq__topic=unique("dlq-events"),
        dlq__max_share="0.1",
        dlq__resume_poll_seconds="0.5",
    )
    trips = {"stage": "dlq", "kind": "limit"}

    def tripped(worker: SinkApp) -> float:
        return worker.metrics.registry.get_sample_value("cdc_errors_total", trips) or 0

    async with pods(env, 2) as workers:
        async with asyncio.timeout(120):
            while not all(len(w.worker.owned) == 1 and w.worker.paused for w in workers):
                await asyncio.sleep(0.2)
        before = [tripped(w) for w in workers]  # a rebalance on the way re-checks, too
        first = workers[0]
        assert first.http is not None
        status, body = await asyncio.to_thread(post_resume, first.http.port)
        assert status == 200
        assert body == {"resumed": [f"{topic}[{p.partition}]" for p in first.worker.owned]}
        async with asyncio.timeout(60):
            while not all(tripped(w) > was for w, was in zip(workers, before, strict=True)):
                await asyncio.sleep(0.2)
        assert all(w.worker.paused for w in workers)


def post_resume(port: int) -> tuple[int, object]:
    """POST /dlq/resume {} to a worker: status and JSON answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/dlq/resume", data=b"{}", method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())
