"""Exactly once under crashes and rebalances: kill -9 mid-stream, workers joining and dying."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.support.cassandra_model import replica_streams
from tests.support.names import Unique
from tests.support.pipeline import (
    applied,
    create_cassandra_model_table,
    create_topic,
    drop_schema,
    execute_cql,
    kill,
    produce,
    random_history,
    run_worker,
    schemaless_record,
    sink_env,
    start_worker_process,
    wait_for_applied,
)
from tests.support.stack import Endpoints

EVENTS = 200_000
KILLS = 10
COMPARED = "p1, p2, c1, c2, v1, v2, v3, _cdc_cells, _cdc_marker_ts, _cdc_deleted_ts"


@pytest.fixture(scope="module")
async def stream(stack: Endpoints) -> dict[str, Any]:
    """One 200,000-event topic (three replica copies of ~67,000 mutations) and the state a
    single uninterrupted worker leaves from it: the reference every crash run must match."""
    tag = f"{int(time.time())}{random.randrange(1000):03d}"
    keyspace, topic = f"crash{tag}", f"cdc-events-crash{tag}"
    rng = random.Random(tag)
    history = random_history(rng, EVENTS // 3, keys=3_000, base_ts=1_900_000_000_000_000)
    deliveries = replica_streams(history, iter(lambda: rng.randrange(1 << 30), None))
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    produced = await produce(
        stack.kafka, topic, (schemaless_record(m, keyspace) for m in deliveries)
    )
    reference = f"reference{tag}"
    await run_worker(sink_env(stack, topic=topic, group=f"ref{tag}", schema=reference))
    yield {"topic": topic, "events": produced, "reference": reference, "tag": tag}
    await drop_schema(stack.postgres_dsn, reference)
    execute_cql(stack, f"DROP KEYSPACE IF EXISTS {keyspace}")


async def table_state(dsn: str, schema: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f'SELECT {COMPARED} FROM "{schema}".cdc_model ORDER BY 1, 2, 3, 4')
        return [tuple(r) for r in rows]
    finally:
        await conn.close()


async def test_kill_9_at_random_moments_changes_nothing(
    stack: Endpoints, stream: dict[str, Any], unique: Unique, tmp_path: Path
) -> None:
    """A worker killed with SIGKILL ten times mid-stream and restarted each time ends with
    exactly the tables of an uninterrupted run, and every offset applied once."""
    schema = unique.schema("killed")
    env = sink_env(
        stack,
        topic=stream["topic"],
        group=unique("group"),
        schema=schema,
        kafka__session_timeout_ms="6000",
    )
    rng = random.Random()
    # Kill points spread over the first 5/6 of the stream, so every kill fits however fast
    # the worker drains; a short random delay after each puts the kill at a random moment
    # of a batch (decoding, mid-transaction, committing).
    kill_points = [int(stream["events"] * (k + rng.random()) / 12) for k in range(KILLS)]
    kills = 0
    log = tmp_path / "worker.log"
    try:
        while True:
            worker = start_worker_process(env, log)
            before = await applied(stack.postgres_dsn, schema)
            if kills < KILLS:
                await wait_for_applied(
                    stack.postgres_dsn, schema, max(before, kill_points[kills]), worker
                )
                await asyncio.sleep(rng.uniform(0.0, 0.2))
                if (
                    worker.poll() is None
                    and await applied(stack.postgres_dsn, schema) < stream["events"]
                ):
                    kill(worker)
                    kills += 1
                    continue
            assert await asyncio.to_thread(worker.wait, 600) == 0, log.read_text()[-3000:]
            break
        assert kills == KILLS
        assert await applied(stack.postgres_dsn, schema) == stream["events"]
        assert await table_state(stack.postgres_dsn, schema) == await table_state(
            stack.postgres_dsn, stream["reference"]
        )
    finally:
        kill(worker)


async def test_workers_joining_and_dying_share_the_partitions(
    stack: Endpoints, stream: dict[str, Any], unique: Unique, tmp_path: Path
) -> None:
    """Three workers in one group, one killed and one added mid-stream: the tables equal an
    uninterrupted single worker's, and every offset is applied once."""
    schema = unique.schema("group")
    env = sink_env(
        stack,
        topic=stream["topic"],
        group=unique("group"),
        schema=schema,
        kafka__session_timeout_ms="6000",
    )
    log = tmp_path / "workers.log"
    workers = [start_worker_process(env, log) for _ in range(3)]
    try:
        await wait_for_applied(stack.postgres_dsn, schema, stream["events"] // 4)
        kill(workers[0])
        await wait_for_applied(stack.postgres_dsn, schema, stream["events"] // 2)
        workers.append(start_worker_process(env, log))
        for worker in workers[1:]:
            assert await asyncio.to_thread(worker.wait, 600) == 0, log.read_text()[-3000:]
        assert await applied(stack.postgres_dsn, schema) == stream["events"]
        assert await table_state(stack.postgres_dsn, schema) == await table_state(
            stack.postgres_dsn, stream["reference"]
        )
    finally:
        for worker in workers:
            kill(worker)
