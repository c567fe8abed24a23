"""The whole pipeline on the real stack: Kafka topic → cdc-sink worker → PostgreSQL."""

from __future__ import annotations

import random
from collections.abc import Callable

import asyncpg
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support.cassandra_model import COLUMNS, CassandraModel, Mutation, replica_streams
from tests.support.pipeline import (
    create_cassandra_model_table,
    create_topic,
    drop_schema,
    produce,
    read_rows,
    run_worker,
    schemaless_record,
    sink_env,
)
from tests.support.stack import Endpoints
from tests.unit.test_plan_model import histories

# Every TTL the generated histories carry lies in the past of the real clock, which is the
# "now" the worker reads at: the model is asked at a time after all of them.
AFTER_ALL_TTLS = 2**62


@settings(
    max_examples=12,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=histories(), seed=st.integers(0, 2**32), batch_size=st.integers(1, 40))
async def test_pipeline_converges_to_cassandra(
    stack: Endpoints,
    unique: Callable[[str], str],
    history: list[Mutation],
    seed: int,
    batch_size: int,
) -> None:
    """Replica copies, duplicates and deletes on other partitions, through real Kafka and
    PostgreSQL in small batches, leave exactly the rows Cassandra's SELECT returns."""
    rng = random.Random(seed)
    deliveries = replica_streams(history, iter(lambda: rng.randrange(1 << 30), None))
    for _ in range(rng.randrange(0, 4)):
        start = rng.randrange(len(deliveries))
        deliveries[start:start] = deliveries[start : start + rng.randrange(1, 6)]
    keyspace, topic, schema = unique("ks"), unique("cdc-events-model"), unique("sink")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, (schemaless_record(m, keyspace) for m in deliveries))
    env = sink_env(
        stack,
        topic=topic,
        group=unique("group"),
        schema=schema,
        sink__batch_size=str(batch_size),
    )
    try:
        worker = await run_worker(env)
        assert worker.applied_events == len(deliveries)
        rows = await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS)
        assert rows == CassandraModel(history).select(AFTER_ALL_TTLS)
        conn = await asyncpg.connect(stack.postgres_dsn)
        try:
            stored = await conn.fetchval(
                f'SELECT sum(next_offset) FROM "{schema}"._cdc_checkpoints'
            )
        finally:
            await conn.close()
        assert stored == len(deliveries)
    finally:
        await drop_schema(stack.postgres_dsn, schema)
