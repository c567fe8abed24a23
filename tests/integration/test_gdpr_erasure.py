"""GDPR erasure against the real stack: a row erased from the command line and a partition
erased through the API while events for both keep arriving, a replayed dead letter and a
reconciliation repair afterwards; nothing of them comes back, and the audit log and the
suppression metric say what happened."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.integration.test_api_security import SECRET, call, running, token
from tests.support.cassandra_model import Mutation
from tests.support.names import Unique
from tests.support.pipeline import (
    cassandra_session,
    create_cassandra_model_table,
    create_topic,
    produce,
    run_cli,
    run_worker,
    schemaless_record,
    sink_env,
    sql,
)
from tests.support.stack import Endpoints

HASH_KEY = "the erasure hash key, at least thirty-two bytes long"
TS = 1_800_000_000_000_000
TARGET = "cdc_model"
ROW = (1, "erase-me", 0, "x")  # erased from the command line
PARTITION = (2, "erase-partition")  # erased through the API, with its three rows
KEPT = [(3, "keep", i, "x") for i in range(5)]
MARKER = (3, "keep", 99, "x")  # written last: once it is in PostgreSQL, all before it is
ROWS = [ROW, *[(*PARTITION, i, "x") for i in range(3)], *KEPT]


def insert(key: tuple[Any, ...], ts: int, v1: int) -> Mutation:
    return Mutation("insert", ts, key, {"v1": (v1, None), "v2": (f"s{v1}", None), "v3": (7, None)})


def update(key: tuple[Any, ...], ts: int, v1: int) -> Mutation:
    return Mutation("update", ts, key, {"v1": (v1, None)})


def write_cassandra(stack: Endpoints, keyspace: str) -> None:
    """Cassandra holds every row, the erased ones included (the application deletes them
    there later): reconciliation would find them missing in PostgreSQL."""
    session = cassandra_session(stack)
    try:
        for key in (*ROWS, MARKER):
            session.execute(
                f"INSERT INTO {keyspace}.model (p1, p2, c1, c2, v1, v2, v3) "
                f"VALUES (%s, %s, %s, %s, %s, %s, 7) USING TIMESTAMP {TS}",
                (*key, 1, "s1"),
            )
    finally:
        session.cluster.shutdown()


async def keys_in(dsn: str, schema: str) -> set[tuple[Any, ...]]:
    rows = await sql(dsn, schema, f"SELECT p1, p2, c1, c2 FROM {TARGET}")
    return {tuple(r) for r in rows}


async def dead_letter(dsn: str, schema: str, topic: str, offset: int, m: Mutation, ks: str) -> int:
    """A good record of `m` kept as a dead letter (as after a failure since fixed)."""
    key, value = schemaless_record(m, ks)
    rows = await sql(
        dsn,
        schema,
        "INSERT INTO _cdc_dlq_records (source_topic, source_partition, source_offset, "
        "record_key, record_value, error_class, error_message, stage) "
        "VALUES ($1, 0, $2, $3, $4, 'TransientError', 'gave up', 'write') RETURNING id",
        topic,
        offset,
        key,
        value,
    )
    return int(rows[0]["id"])


@pytest.mark.timeout(900)
async def test_erased_keys_stay_erased(stack: Endpoints, unique: Unique) -> None:
    """A row erased with `gdpr erase` (after its dead letter was replayed and more of its
    events were produced) and a partition erased with POST /gdpr/erasures while its events keep
    arriving: their rows, tombstones, dead letters and mismatches are gone, no later event,
    replay or repair writes them again, the skipped events are counted in
    cdc_erasure_suppressed_total, reconciliation reports no mismatch for them, and the audit
    log names who erased what by the key's hash only; without the cdc:erase scope the API
    answers 401/403."""
    keyspace = unique.keyspace("gdpr")
    topic = unique("cdc-events-gdpr")
    schema = unique.schema("gdpr")
    create_cassandra_model_table(stack, keyspace)
    write_cassandra(stack, keyspace)
    await create_topic(stack.kafka, topic, partitions=1)  # the marker comes last
    env = sink_env(
        stack,
        topic=topic,
        group=unique("g"),
        schema=schema,
        api__jwt_secret=SECRET,
        gdpr__hash_key=HASH_KEY,
    )
    dsn = stack.postgres_dsn
    record = lambda m: schemaless_record(m, keyspace)  # noqa: E731
    await produce(stack.kafka, topic, [record(insert(k, TS, 1)) for k in ROWS])
    await run_worker(env)
    assert await keys_in(dsn, schema) == set(ROWS)

    # What the sink keeps of the row besides it: a dead letter and a reconciliation mismatch;
    # and of the partition: a row tombstone (c1 = 2 deleted).
    own_letter = await dead_letter(dsn, schema, topic, 10**9, update(ROW, TS + 5, 500), keyspace)
    other_letter = await dead_letter(
        dsn, schema, topic, 10**9 + 1, update(KEPT[0], TS + 5, 500), keyspace
    )
    job_rows = await sql(
        dsn,
        schema,
        "INSERT INTO _cdc_reconciliation_jobs (target_table, strategy) VALUES ($1, 'checksum') "
        "RETURNING id",
        TARGET,
    )
    for key in (ROW, KEPT[1]):
        await sql(
            dsn,
            schema,
            "INSERT INTO _cdc_reconciliation_mismatches (job_id, target_table, row_key, kind) "
            "VALUES ($1, $2, $3::jsonb, 'value_mismatch')",
            job_rows[0]["id"],
            TARGET,
            json.dumps(list(key)),
        )
    doomed = (*PARTITION, 2, "x")
    await produce(stack.kafka, topic, [record(Mutation("delete_row", TS + 1, doomed))])
    await run_worker(env)
    stones = await sql(dsn, schema, "SELECT partition_key::text AS k FROM _cdc_tombstones")
    assert [json.loads(s["k"])[:2] for s in stones] == [list(PARTITION)]

    # Row erasure while no worker runs: the replayed dead letter and three more events of the
    # row wait in the topic.
    replayed = run_cli(env, "dlq", "replay", str(own_letter))
    assert replayed.returncode == 0, replayed.stderr
    await produce(stack.kafka, topic, [record(update(ROW, TS + 10 + i, 10 + i)) for i in range(3)])
    key_json = json.dumps(dict(zip(("p1", "p2", "c1", "c2"), ROW, strict=True)))
    erased = run_cli(env, "gdpr", "erase", "--table", TARGET, "--key", key_json)
    assert erased.returncode == 0, erased.stderr
    row_erasure = json.loads(erased.stdout)
    assert row_erasure["status"] == "completed"
    assert row_erasure["erased"] == {"rows": 1, "tombstones": 0, "mismatches": 1, "dead_letters": 1}
    letters = await sql(dsn, schema, "SELECT id FROM _cdc_dlq_records ORDER BY id")
    assert [r["id"] for r in letters] == [other_letter]
    mismatches = await sql(
        dsn, schema, "SELECT row_key::text AS k FROM _cdc_reconciliation_mismatches"
    )
    assert [json.loads(m["k"]) for m in mismatches] == [list(KEPT[1])]

    # Partition erasure through the API while events of both keys keep coming.
    produced_after = 0
    partition_erased = False
    stop = asyncio.Event()

    async def keep_writing() -> None:
        nonlocal produced_after
        n = 0
        while not stop.is_set():
            n += 1
            batch = [
                record(update(ROW, TS + 100 + n, n)),
                *[record(update((*PARTITION, c, "x"), TS + 100 + n, n)) for c in range(3)],
            ]
            await produce(stack.kafka, topic, batch)
            if partition_erased:
                produced_after += len(batch)
            await asyncio.sleep(0.02)

    async with running(env) as worker:
        assert worker.http is not None
        port = worker.http.port
        writer_task = asyncio.create_task(keep_writing())
        try:
            body = {"table": TARGET, "key": {"p1": PARTITION[0], "p2": PARTITION[1]}}
            refused = [
                (await asyncio.to_thread(call, port, "POST", "/gdpr/erasures", bearer, body))[0]
                for bearer in (None, token(scope="cdc:write cdc:read cdc:payload"))
            ]
            assert refused == [401, 403]
            await asyncio.sleep(0.5)  # events of the partition are being applied
            status, _, partition_erasure = await asyncio.to_thread(
                call, port, "POST", "/gdpr/erasures", token(scope="cdc:erase", sub="dpo"), body
            )
            assert status == 201, partition_erasure
            partition_erased = True
            while produced_after < 40:
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await writer_task
        await produce(stack.kafka, topic, [record(insert(MARKER, TS, 1))])
        async with asyncio.timeout(120):
            while MARKER not in await keys_in(dsn, schema):
                await asyncio.sleep(0.2)
        status, _, shown = await asyncio.to_thread(
            call, port, "GET", f"/gdpr/erasures/{partition_erasure['id']}", token(scope="cdc:read")
        )
        assert (status, shown["status"], shown["scope"]) == (200, "completed", "partition")
        suppressed = worker.metrics.registry.get_sample_value(
            "cdc_erasure_suppressed_total", {"table": TARGET}
        )
    assert await keys_in(dsn, schema) == {*KEPT, MARKER}
    # Every event of the row after its erasure (the replay, three, and one per round), and at
    # least those of the partition produced after its erasure answered.
    assert suppressed is not None
    assert suppressed >= 1 + 3 + produced_after
    assert await sql(dsn, schema, "SELECT 1 FROM _cdc_tombstones") == []

    # Reconciliation: Cassandra still has the erased rows; only the real drift is reported,
    # and the repair leaves the erased rows out.
    await sql(dsn, schema, f"DELETE FROM {TARGET} WHERE p2 = 'keep' AND c1 = 4")
    job = run_cli(env, "reconcile", "run", "--table", TARGET, "--strategy", "checksum")
    assert job.returncode == 0, job.stderr
    found = await sql(
        dsn,
        schema,
        "SELECT job_id, row_key::text AS k, kind FROM _cdc_reconciliation_mismatches "
        "WHERE job_id = (SELECT max(id) FROM _cdc_reconciliation_jobs)",
    )
    assert [(json.loads(f["k"]), f["kind"]) for f in found] == [
        (list(KEPT[4]), "missing_in_postgres")
    ]
    repair = run_cli(env, "reconcile", "repair", "--job", str(found[0]["job_id"]))
    assert repair.returncode == 0, repair.stderr
    assert await keys_in(dsn, schema) == {*KEPT, MARKER}

    audit = await sql(
        dsn,
        schema,
        "SELECT actor, details::text AS d FROM _cdc_audit_log WHERE action = 'gdpr_erase' "
        "ORDER BY id",
    )
    assert [a["actor"] for a in audit][1:] == ["dpo"]
    assert audit[0]["actor"].startswith("cli:")
    for entry, erasure in zip(audit, (row_erasure, partition_erasure), strict=True):
        details = json.loads(entry["d"])
        assert details["key_hash"] == erasure["key_hash"]
        assert "erase-me" not in entry["d"]
        assert "erase-partition" not in entry["d"]
    kept = await sql(dsn, schema, "SELECT encode(key_hash, 'hex') AS h FROM _cdc_erased_keys")
    assert sorted(k["h"] for k in kept) == sorted(
        e["key_hash"] for e in (row_erasure, partition_erasure)
    )
