"""Retention against the real stack: housekeeping purges 100,000 old dead letters, old resolved
mismatches and old audit entries in small transactions while the writer keeps committing."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.test_api_security import running
from tests.support.cassandra_model import Mutation
from tests.support.names import Unique
from tests.support.pipeline import (
    create_cassandra_model_table,
    create_topic,
    produce,
    run_worker,
    schemaless_record,
    sink_env,
    sql,
)
from tests.support.stack import Endpoints

OLD_LETTERS = 100_000
RETAINED = ("_cdc_dlq_records", "_cdc_reconciliation_mismatches", "_cdc_audit_log")
TS = 1_800_000_000_000_000


def event(i: int) -> Mutation:
    return Mutation("insert", TS + i, (i % 3, "r", i, "x"), {"v1": (i, None)})


@pytest.mark.timeout(900)
async def test_old_rows_are_purged_in_batches_while_the_writer_commits(
    stack: Endpoints, unique: Unique
) -> None:
    """100,000 dead letters past 30 days, resolved mismatches past 30 days and audit entries
    past 365 days are deleted (cdc_retention_purged_total says how many of each), newer ones
    and open mismatches stay; while the dead letters are being purged the partition's
    checkpoint keeps moving, so the purge never blocks the writer."""
    keyspace = unique.keyspace("retention")
    topic = unique("cdc-events-retention")
    schema = unique.schema("retention")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, partitions=1)
    env = sink_env(
        stack,
        topic=topic,
        group=unique("g"),
        schema=schema,
        sink__expiry_interval_seconds="0.1",
        gdpr__retention_batch_rows="500",
    )
    dsn = stack.postgres_dsn
    record = lambda m: schemaless_record(m, keyspace)  # noqa: E731
    await produce(stack.kafka, topic, [record(event(0))])
    # The first run migrates and applies; its housekeeping has no time to purge anything.
    await run_worker({**env, "CDC_GDPR__RETENTION_INTERVAL_SECONDS": "3600"})
    await sql(
        dsn,
        schema,
        "INSERT INTO _cdc_dlq_records (source_topic, source_partition, source_offset, "
        "record_key, record_value, error_class, error_message, stage, failed_at) "
        "SELECT 'old', 0, n, 'k'::bytea, 'v'::bytea, 'DecodeError', 'bad', 'decode', "
        "now() - interval '31 days' - n * interval '1 second' "
        f"FROM generate_series(1, {OLD_LETTERS}) AS n",
    )
    await sql(
        dsn,
        schema,
        "INSERT INTO _cdc_dlq_records (source_topic, source_partition, source_offset, "
        "error_class, error_message, stage, failed_at) "
        "VALUES ('recent', 0, 1, 'DecodeError', 'bad', 'decode', now() - interval '29 days')",
    )
    job = await sql(
        dsn,
        schema,
        "INSERT INTO _cdc_reconciliation_jobs (target_table, strategy) "
        "VALUES ('cdc_model', 'checksum') RETURNING id",
    )
    await sql(
        dsn,
        schema,
        "INSERT INTO _cdc_reconciliation_mismatches "
        "(job_id, target_table, row_key, kind, status, resolved_at) VALUES "
        "($1, 'cdc_model', '[1]', 'missing_in_postgres', 'resolved', now() - interval '31 days'), "
        "($1, 'cdc_model', '[2]', 'missing_in_postgres', 'resolved', now() - interval '1 day'), "
        "($1, 'cdc_model', '[3]', 'missing_in_postgres', 'open', NULL)",
        job[0]["id"],
    )
    await sql(
        dsn,
        schema,
        "UPDATE _cdc_reconciliation_mismatches SET created_at = now() - interval '400 days'",
    )
    await sql(
        dsn,
        schema,
        "INSERT INTO _cdc_audit_log (at, actor, action) VALUES "
        "(now() - interval '366 days', 'old', 'x'), (now() - interval '364 days', 'kept', 'x')",
    )

    samples: list[tuple[int, int]] = []  # (old dead letters left, the partition's checkpoint)
    stop = asyncio.Event()

    async def keep_writing() -> None:
        n = 1
        while not stop.is_set():
            await produce(stack.kafka, topic, [record(event(i)) for i in range(n, n + 20)])
            n += 20
            await asyncio.sleep(0.01)

    async def watch() -> None:
        while not stop.is_set():
            rows = await sql(
                dsn,
                schema,
                "SELECT (SELECT count(*) FROM _cdc_dlq_records WHERE source_topic = 'old') AS o, "
                "(SELECT next_offset FROM _cdc_checkpoints) AS c",
            )
            samples.append((rows[0]["o"], rows[0]["c"]))
            if rows[0]["o"] == 0:
                return
            await asyncio.sleep(0.02)

    writer = asyncio.create_task(keep_writing())
    try:
        async with running(env) as worker:
            async with asyncio.timeout(600):
                await watch()
            metric = worker.metrics.registry.get_sample_value
            purged = {
                table: metric("cdc_retention_purged_total", {"table": table})
                for table in (
                    "_cdc_dlq_records",
                    "_cdc_reconciliation_mismatches",
                    "_cdc_audit_log",
                )
            }
    finally:
        stop.set()
        await writer

    during = [(left, offset) for left, offset in samples if 0 < left < OLD_LETTERS]
    assert len({offset for _, offset in during}) >= 2, samples  # commits while purging
    assert purged == {
        "_cdc_dlq_records": OLD_LETTERS,
        "_cdc_reconciliation_mismatches": 1,
        "_cdc_audit_log": 1,
    }
    left = await sql(dsn, schema, "SELECT source_topic FROM _cdc_dlq_records")
    assert [r["source_topic"] for r in left] == ["recent"]
    mismatches = await sql(
        dsn, schema, "SELECT row_key::text AS k FROM _cdc_reconciliation_mismatches ORDER BY id"
    )
    assert [m["k"] for m in mismatches] == ["[2]", "[3]"]
    audit = await sql(dsn, schema, "SELECT actor FROM _cdc_audit_log ORDER BY id")
    assert "old" not in [a["actor"] for a in audit]
    assert "kept" in [a["actor"] for a in audit]
