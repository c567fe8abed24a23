"""The whole pipeline on the real stack: Kafka topic → cdc-sink worker → PostgreSQL."""

from __future__ import annotations

import random

import asyncpg
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support.cassandra_model import COLUMNS, CassandraModel, Mutation, replica_streams
from tests.support.names import Unique
from tests.support.pipeline import (
    create_cassandra_model_table,
    create_topic,
    json_with_schema,
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
    max_examples=60,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=histories(), seed=st.integers(0, 2**32), batch_size=st.integers(1, 40))
async def test_pipeline_converges_to_cassandra(
    stack: Endpoints, unique: Unique, history: list[Mutation], seed: int, batch_size: int
) -> None:
    """Replica copies, duplicates and deletes on other partitions, through real Kafka and
    PostgreSQL in small batches, leave exactly the rows Cassandra's SELECT returns."""
    rng = random.Random(seed)
    deliveries = replica_streams(history, iter(lambda: rng.randrange(1 << 30), None))
    for _ in range(rng.randrange(0, 4)):
        start = rng.randrange(len(deliveries))
        deliveries[start:start] = deliveries[start : start + rng.randrange(1, 6)]
    keyspace, schema = unique.keyspace("ks"), unique.schema("sink")
    topic = unique("cdc-events-model")
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
    worker = await run_worker(env)
    assert worker.applied_events == len(deliveries)
    rows = await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS)
    assert rows == CassandraModel(history).select(AFTER_ALL_TTLS)
    conn = await asyncpg.connect(stack.postgres_dsn)
    try:
        stored = await conn.fetchval(f'SELECT sum(next_offset) FROM "{schema}"._cdc_checkpoints')
    finally:
        await conn.close()
    assert stored == len(deliveries)


async def test_hostile_identifiers_land_or_are_dead_lettered(
    stack: Endpoints, unique: Unique
) -> None:
    """Tables and columns named `Order`, `select`, `a"b` and in CJK land as quoted
    identifiers; a 64-byte column name goes to the dead-letter table with a clear message."""
    topic, schema = unique("cdc-events-hostile"), unique.schema("hostile")
    columns = {"select": "int32", 'a"b': "string", "名前": "string", "Order": "int64"}
    long_name = "c" * 64
    good = json_with_schema(
        "Shop", "Order", columns, {"select": 1}, {'a"b': "quoted", "名前": "名", "Order": 7}
    )
    bad = json_with_schema(
        "Shop", "other", {"id": "int32", long_name: "int32"}, {"id": 1}, {long_name: 1}
    )
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, [good, bad])
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    env["CDC_CASSANDRA__CONTACT_POINTS"] = ""  # types from the records' own schemas
    worker = await run_worker(env)
    assert worker.applied_events == 2
    conn = await asyncpg.connect(stack.postgres_dsn)
    try:
        row = await conn.fetchrow(f'SELECT * FROM "{schema}"."cdc_Order"')
        letters = await conn.fetch(
            f'SELECT stage, error_class, error_message FROM "{schema}"._cdc_dlq_records'
        )
    finally:
        await conn.close()
    assert (row["select"], row['a"b'], row["名前"], row["Order"]) == (1, "quoted", "名", 7)
    assert len(letters) == 1
    assert letters[0]["error_class"] == "IdentifierError"
    assert "63" in letters[0]["error_message"]
