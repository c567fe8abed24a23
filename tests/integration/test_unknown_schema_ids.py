"""A flood of records with random schema ids among good Avro records, against the real stack
and its registry: each is dead-lettered, every good record is applied, and the caches of
refused ids stay bounded."""

from __future__ import annotations

import asyncio
import random
import struct
import time

import asyncpg

from cdc_synth import synth
from cdc_synth.demo import create_cassandra_tables
from tests.support.names import Unique
from tests.support.pipeline import produce_positions, run_worker, sink_env
from tests.support.stack import Endpoints

GOOD, RANDOM_IDS, KEPT = 3000, 60, 16


async def test_random_schema_ids_are_dead_lettered_without_waiting_for_each(
    stack: Endpoints, unique: Unique
) -> None:
    """2 % of the records carry schema ids no registry issued: every one is dead-lettered, every
    good record is applied, at most CDC_SCHEMA_REGISTRY__MAX_UNKNOWN_IDS refused ids are
    remembered, and only the first few ids cost the wait for a registry that lags (the rest are
    refused at its first answer)."""
    prefix, schema = unique("cdc-events-ids") + "-", unique.schema("ids")
    await asyncio.to_thread(create_cassandra_tables, stack.values)
    generator = synth.Generator(11, start_us=time.time_ns() // 1000)
    rng = random.Random(11)
    topics = [synth.topic_for(table, prefix) for table in synth.TABLES]
    random_ids = rng.sample(range(1_500_000_000, 2_000_000_000), RANDOM_IDS)
    for part in range(3):  # the random ids among the good records, not after them
        await synth.produce(
            stack.kafka,
            generator.take(GOOD // 3),
            "avro",
            stack.schema_registry_url,
            topic_prefix=prefix,
        )
        for schema_id in random_ids[part::3]:
            value = b"\x00" + struct.pack(">I", schema_id) + b"\x02\x06abc"
            await produce_positions(stack.kafka, rng.choice(topics), [(None, value)])
    env = sink_env(
        stack,
        topic=f"{prefix}.*",
        group=unique("g"),
        schema=schema,
        schema_registry__max_unknown_ids=str(KEPT),
    )
    worker = await run_worker(env)
    conn = await asyncpg.connect(stack.postgres_dsn)
    try:
        letters = await conn.fetch(
            f'SELECT error_class, stage, schema_id FROM "{schema}"._cdc_dlq_records'
        )
        rows = {
            table: await conn.fetchval(f'SELECT count(*) FROM "{schema}"."cdc_{table}"')
            for table in synth.TABLES
        }
    finally:
        await conn.close()
    assert sorted(r["schema_id"] for r in letters) == sorted(random_ids)
    assert {(r["error_class"], r["stage"]) for r in letters} == {("DecodeError", "decode")}
    assert rows == generator.live_rows()
    assert worker.decoder.refused_ids <= KEPT
    assert worker.registry is not None
    assert worker.registry.unknown_ids <= KEPT
    assert worker.registry.waited_ids < RANDOM_IDS // 2
