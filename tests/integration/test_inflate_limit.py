"""A compressed record batch that inflates far beyond the limit, against the real stack: the
worker's memory stays bounded, the batch is dead-lettered as one, and the stream goes on."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg

from tests.support.cassandra_model import Mutation
from tests.support.names import Unique
from tests.support.pipeline import (
    create_cassandra_model_table,
    create_topic,
    kill,
    produce_positions,
    read_rows,
    run_cli,
    schemaless_record,
    sink_env,
    start_worker_process,
)
from tests.support.raw_batches import produce_batch, zstd_batch_of_zeros
from tests.support.stack import Endpoints

MiB = 1024 * 1024
LIMIT = 16 * MiB
FLOOD_RECORDS, FLOOD_VALUE = 64, 16 * MiB  # 1 GiB inflated, some tens of KiB on the wire
# The worker's address space: enough to run (it maps ~1 GiB of libraries and arenas at rest),
# far too little to hold the flood once inflated (aiokafka would ask for 2 GiB at once).
ADDRESS_SPACE = 2560 * MiB
PEAK_RSS_BOUND = 400 * MiB


def good(i: int, keyspace: str) -> tuple[bytes, bytes]:
    m = Mutation("insert", 1_000 + i, (0, "a", i, "x"), {"v1": (i, None)})
    return schemaless_record(m, keyspace)


def resident_peak(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes; 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0  # a zombie: its memory is gone


async def test_a_batch_inflating_far_beyond_the_limit_is_dead_lettered_in_bounded_memory(
    stack: Endpoints, unique: Unique, tmp_path: Path
) -> None:
    """A zstd batch of ~34 KiB that inflates to 1 GiB (limit 16 MiB): the worker's peak RSS stays
    far below it, the batch becomes one dead letter naming the setting and its offsets, and
    every good record before and after it, on its partition and the other, is applied."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("inflate")
    topic = unique("cdc-events-inflate")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, 2)
    before = await produce_positions(
        stack.kafka, topic, [good(i, keyspace) for i in range(0, 20)], partition=0
    )
    flood = zstd_batch_of_zeros(FLOOD_RECORDS, FLOOD_VALUE, int(time.time() * 1000))
    assert len(flood) < 256 * 1024
    first = await produce_batch(stack.kafka, topic, 0, flood)
    after = await produce_positions(
        stack.kafka, topic, [good(i, keyspace) for i in range(20, 40)], partition=0
    )
    other = await produce_positions(
        stack.kafka, topic, [good(i, keyspace) for i in range(40, 60)], partition=1
    )
    assert first == before[-1][1] + 1
    last = first + FLOOD_RECORDS - 1
    env = sink_env(
        stack,
        topic=topic,
        group=unique("g"),
        schema=schema,
        kafka__max_inflated_batch_bytes=str(LIMIT),
    )
    log_path = tmp_path / "worker.log"
    worker = start_worker_process(env, log_path, address_space=ADDRESS_SPACE)
    try:
        # The worker's own high-water mark, read until it exits. Not wait4's ru_maxrss: that
        # also counts the pytest process it was forked from, as it was before exec.
        peak = 0
        async with asyncio.timeout(300):
            while worker.poll() is None:
                peak = max(peak, resident_peak(worker.pid))
                await asyncio.sleep(0.02)
        output = log_path.read_text()
        assert worker.returncode == 0, output[-3000:]
        print(f"worker peak RSS {peak / MiB:.0f} MiB; the batch inflates to 1024 MiB")
        assert peak < PEAK_RSS_BOUND, f"peak RSS {peak / MiB:.0f} MiB"

        stored = await read_rows(stack.postgres_dsn, schema, "cdc_model", ("v1",))
        assert stored == {(0, "a", i, "x"): {"v1": i} for i in range(60)}
        conn = await asyncpg.connect(stack.postgres_dsn)
        try:
            letters = await conn.fetch(
                f"SELECT source_partition, source_offset, record_value, error_class, stage, "
                f'error_message FROM "{schema}"._cdc_dlq_records'
            )
            checkpoints = dict(
                await conn.fetch(
                    f'SELECT kafka_partition, next_offset FROM "{schema}"._cdc_checkpoints'
                )
            )
        finally:
            await conn.close()
        [letter] = letters
        assert (letter["source_partition"], letter["source_offset"]) == (0, last)
        assert letter["record_value"] == b""
        assert (letter["error_class"], letter["stage"]) == ("BatchInflateError", "fetch")
        assert letter["error_message"].startswith(f"record batch at offsets {first}..{last} (zstd")
        assert f"CDC_KAFKA__MAX_INFLATED_BATCH_BYTES ({LIMIT} bytes)" in letter["error_message"]
        assert checkpoints == {0: after[-1][1] + 1, 1: other[-1][1] + 1}

        # The letter holds no record: a replay of everything passes over it.
        replay = await asyncio.to_thread(run_cli, env, "dlq", "replay", "--all", timeout=120)
        assert replay.returncode == 0, replay.stderr
        conn = await asyncpg.connect(stack.postgres_dsn)
        try:
            status = await conn.fetchval(f'SELECT status FROM "{schema}"._cdc_dlq_records')
        finally:
            await conn.close()
        assert status == "pending"
    finally:
        kill(worker)
