"""GDPR erasure against the real stack: a row erased from the command line and a partition
erased through the API while events for both keep arriving, a replayed dead letter and a
reconciliation repair afterwards; nothing of them comes back, and the audit log and the
suppression metric say what happened."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
import structlog

from cdc_recon.alerting import ReconMetrics
from cdc_recon.service import Reconciler
from cdc_sink.apply.suppression import ROW as ROW_SCOPE
from cdc_sink.apply.suppression import Suppression, key_hash
from cdc_sink.apply.writer import json_key
from cdc_sink.config import Secret
from cdc_sink.consumer import applier
from cdc_sink.errors import FatalError
from cdc_sink.schema.tables import lock_id
from tests.integration.test_api_security import SECRET, call, running, token
from tests.support.cassandra_model import Mutation
from tests.support.names import Unique
from tests.support.pipeline import (
    cassandra_session,
    create_cassandra_model_table,
    create_topic,
    http_get,
    produce,
    produce_positions,
    read_topic,
    run_cli,
    run_worker,
    schemaless_record,
    sink_env,
    sql,
)
from tests.support.recon_data import reconciler_on
from tests.support.stack import Endpoints
from tests.support.vault import root_client

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


async def mismatch(dsn: str, schema: str, job: int, key: tuple[Any, ...], kind: str) -> None:
    """A reconciliation mismatch of `key` recorded by job `job`."""
    await sql(
        dsn,
        schema,
        "INSERT INTO _cdc_reconciliation_mismatches (job_id, target_table, row_key, kind) "
        "VALUES ($1, $2, $3::jsonb, $4)",
        job,
        TARGET,
        json.dumps(list(key)),
        kind,
    )


async def prepare(stack: Endpoints, unique: Unique, name: str) -> tuple[str, str, str]:
    """The test's own keyspace with the model table, one-partition topic and schema."""
    keyspace = unique.keyspace(name)
    topic = unique(f"cdc-events-{name}")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, partitions=1)
    return keyspace, topic, unique.schema(name)


@pytest.mark.timeout(900)
async def test_erased_keys_stay_erased(stack: Endpoints, unique: Unique) -> None:
    """A row erased with `gdpr erase` (after its dead letter was replayed and more of its
    events were produced) and a partition erased with POST /gdpr/erasures while its events keep
    arriving: their rows, tombstones, dead letters and mismatches are gone, no later event,
    replay or repair writes them again, the skipped events are counted in
    cdc_erasure_suppressed_total, reconciliation reports no mismatch for them, and the audit
    log names who erased what by the key's hash only; a mismatch of an erased key recorded
    after the erasure is dropped by the repair, not repaired; without the cdc:erase scope the
    API answers 401/403."""
    keyspace, topic, schema = await prepare(stack, unique, "gdpr")  # the marker comes last
    write_cassandra(stack, keyspace)
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
        await mismatch(dsn, schema, job_rows[0]["id"], key, "value_mismatch")
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
            "cdc_erasure_suppressed_total", {"table": TARGET, "path": "stream"}
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
    # A job that had found the erased row missing before the erasure recorded it after.
    await mismatch(dsn, schema, found[0]["job_id"], ROW, "missing_in_postgres")
    repair = run_cli(env, "reconcile", "repair", "--job", str(found[0]["job_id"]))
    assert repair.returncode == 0, repair.stderr
    assert await keys_in(dsn, schema) == {*KEPT, MARKER}
    left = await sql(
        dsn,
        schema,
        "SELECT row_key::text AS k, status FROM _cdc_reconciliation_mismatches WHERE job_id = $1",
        found[0]["job_id"],
    )
    assert [(json.loads(m["k"]), m["status"]) for m in left] == [(list(KEPT[4]), "resolved")]

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


@pytest.mark.timeout(600)
async def test_erasure_refuses_what_it_cannot_do(stack: Endpoints, unique: Unique) -> None:
    """Without a hash key POST /gdpr/erasures answers 503 and `gdpr erase` exits 2; an unknown
    table is 404 (exit 2), a key that is not the table's 400 (exit 2), an unknown erasure 404
    (`gdpr show` exit 1); the hash key may come from Vault KV (the same hash as from the
    setting) and a Vault secret without it stops the command naming the setting; a worker
    without the hash key stops before it writes a table that has erasures."""
    keyspace, topic, schema = await prepare(stack, unique, "gdprno")
    bare = sink_env(stack, topic=topic, group=unique("g"), schema=schema, api__jwt_secret=SECRET)
    keyed = {**bare, "CDC_GDPR__HASH_KEY": HASH_KEY}
    dsn = stack.postgres_dsn
    record = lambda m: schemaless_record(m, keyspace)  # noqa: E731
    await produce(stack.kafka, topic, [record(insert(ROW, TS, 1))])
    await run_worker(bare)
    key_json = json.dumps(dict(zip(("p1", "p2", "c1", "c2"), ROW, strict=True)))
    body = {"table": TARGET, "key": json.loads(key_json)}
    eraser = token(scope="cdc:erase cdc:read")

    async with running(bare) as worker:
        assert worker.http is not None
        answer = await asyncio.to_thread(
            call, worker.http.port, "POST", "/gdpr/erasures", eraser, body
        )
        assert (answer[0], "CDC_GDPR__HASH_KEY" in answer[2]["error"]) == (503, True)
    no_key = run_cli(bare, "gdpr", "erase", "--table", TARGET, "--key", key_json)
    assert (no_key.returncode, "CDC_GDPR__HASH_KEY" in no_key.stderr) == (2, True)

    async with running(keyed) as worker:
        assert worker.http is not None
        port = worker.http.port
        refusals = [
            (await asyncio.to_thread(call, port, method, path, eraser, request))[0]
            for method, path, request in (
                ("POST", "/gdpr/erasures", {**body, "table": "cdc_nothing"}),
                ("POST", "/gdpr/erasures", {**body, "key": {"p1": 1}}),
                ("POST", "/gdpr/erasures", {**body, "key": {"p1": "one", "p2": "x"}}),
                ("POST", "/gdpr/erasures", {**body, "key": {"p1": None, "p2": "x"}}),
                ("POST", "/gdpr/erasures", {**body, "keys": []}),
                ("GET", "/gdpr/erasures/999999", None),
            )
        ]
        assert refusals == [404, 400, 400, 400, 400, 404]
    for args, code, said in (
        (("--table", "cdc_nothing", "--key", key_json), 2, "cdc_nothing"),
        (("--table", TARGET, "--key", "{not json"), 2, ""),
        (("--table", TARGET, "--key", "[1]"), 2, "JSON object"),
        (("--table", TARGET, "--key", '{"p1": 1, "c1": 0}'), 2, "partition key (p1, p2)"),
    ):
        refused = run_cli(keyed, "gdpr", "erase", *args)
        assert (refused.returncode, said in refused.stderr) == (code, True), refused.stderr
    unknown = run_cli(keyed, "gdpr", "show", "999999")
    assert (unknown.returncode, "no erasure 999999" in unknown.stderr) == (1, True)
    assert await keys_in(dsn, schema) == {ROW}
    assert await sql(dsn, schema, "SELECT 1 FROM _cdc_erasures") == []

    path = unique("gdpr-hash-key")
    client = root_client(stack)
    vault = {
        **bare,
        "CDC_VAULT__ADDR": stack.vault_addr,
        "CDC_VAULT__TOKEN": stack.vault_token,
        "CDC_VAULT__GDPR_HASH_KEY": path,
    }
    runs = []
    try:
        for secret in ({"key": HASH_KEY}, {"secret": HASH_KEY}):
            await asyncio.to_thread(
                client.secrets.kv.v2.create_or_update_secret,
                path,
                secret=secret,
                mount_point="secret",
            )
            runs.append(run_cli(vault, "gdpr", "erase", "--table", TARGET, "--key", key_json))
    finally:
        await asyncio.to_thread(
            client.secrets.kv.v2.delete_metadata_and_all_versions, path, mount_point="secret"
        )
    refused_secret, done = runs
    assert refused_secret.returncode == 1
    assert "CDC_VAULT__GDPR_HASH_KEY" in refused_secret.stderr
    assert done.returncode == 0, done.stderr
    expected = key_hash(Secret(HASH_KEY), TARGET, ROW_SCOPE, '[1,"erase-me",0,"x"]')
    assert json.loads(done.stdout)["key_hash"] == expected.hex()
    assert await keys_in(dsn, schema) == set()

    # A worker that cannot tell erased keys stops rather than write the table blindly.
    await produce(stack.kafka, topic, [record(update(ROW, TS + 1, 2))])
    with pytest.raises(FatalError, match="CDC_GDPR__HASH_KEY"):
        await run_worker(bare)
    assert await keys_in(dsn, schema) == set()
    await run_worker(keyed)
    assert await keys_in(dsn, schema) == set()


def key_arg(key: tuple[Any, ...]) -> str:
    return json.dumps(dict(zip(("p1", "p2", "c1", "c2"), key, strict=True)))


@pytest.mark.timeout(600)
async def test_erasures_of_one_table_in_flight_together_both_stay_erased(
    stack: Endpoints, unique: Unique
) -> None:
    """An erasure held mid-transaction (a row lock stops it after it has taken its suppression
    id) and a second one of the same table started meanwhile, while the worker applies a batch
    of the table: once both have ended, later events of neither key are written (a writer that
    had seen the second id also knows the first)."""
    keyspace, topic, schema = await prepare(stack, unique, "gdprtwo")
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, gdpr__hash_key=HASH_KEY)
    dsn = stack.postgres_dsn
    record = lambda m: schemaless_record(m, keyspace)  # noqa: E731
    first, second = (1, "first", 0, "x"), (2, "second", 0, "x")
    other = [(3, "other", i, "x") for i in range(3)]
    await produce(stack.kafka, topic, [record(insert(k, TS, 1)) for k in (first, second, other[0])])
    await run_worker(env)

    async def applied(key: tuple[Any, ...]) -> None:
        async with asyncio.timeout(120):
            while key not in await keys_in(dsn, schema):
                await asyncio.sleep(0.1)

    async def blocked_by(pid: int) -> list[int]:
        """The sessions waiting for a lock `pid` holds."""
        rows = await sql(
            dsn,
            schema,
            "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            pid,
        )
        return [r["pid"] for r in rows]

    async with running(env) as worker:
        holder = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            hold = holder.transaction()
            await hold.start()
            await holder.execute(f"SELECT 1 FROM {TARGET} WHERE p1 = 1 FOR UPDATE")
            erase_first = asyncio.create_task(
                asyncio.to_thread(
                    run_cli, env, "gdpr", "erase", "--table", TARGET, "--key", key_arg(first)
                )
            )
            async with asyncio.timeout(120):
                while not (waiting := await blocked_by(holder.get_server_pid())):
                    await asyncio.sleep(0.05)  # until its DELETE waits for our row lock
            erase_second = asyncio.create_task(
                asyncio.to_thread(
                    run_cli, env, "gdpr", "erase", "--table", TARGET, "--key", key_arg(second)
                )
            )
            async with asyncio.timeout(120):
                while not erase_second.done() and not await blocked_by(waiting[0]):
                    await asyncio.sleep(0.05)
            await produce(stack.kafka, topic, [record(insert(other[1], TS, 1))])
            await applied(other[1])  # a batch of the table, with one erasure or none committed
        finally:
            await hold.rollback()
            await holder.close()
        done = [await erase_first, await erase_second]
        assert [d.returncode for d in done] == [0, 0], [d.stderr for d in done]
        later = [record(update(k, TS + 10, 2)) for k in (first, second)]
        await produce(stack.kafka, topic, [*later, record(insert(other[2], TS, 1))])
        await applied(other[2])
        suppressed = worker.metrics.registry.get_sample_value(
            "cdc_erasure_suppressed_total", {"table": TARGET, "path": "stream"}
        )
    assert await keys_in(dsn, schema) == set(other)
    assert suppressed == 2


def suppressed(worker: Any, path: str) -> float:
    """cdc_erasure_suppressed_total of the model table and `path` in a worker's registry."""
    value = worker.metrics.registry.get_sample_value(
        "cdc_erasure_suppressed_total", {"table": TARGET, "path": path}
    )
    return value or 0.0


def out_of_range(key: tuple[Any, ...], ts: int) -> Mutation:
    """An update whose v1 does not fit PostgreSQL's integer: poison found when converting."""
    return update(key, ts, 3_000_000_000)


async def letters_of(dsn: str, schema: str) -> list[tuple[int, bytes]]:
    """(source offset, record key) of every stored dead letter."""
    rows = await sql(
        dsn, schema, "SELECT source_offset, record_key FROM _cdc_dlq_records ORDER BY id"
    )
    return [(r["source_offset"], bytes(r["record_key"])) for r in rows]


async def applied_with_dlq(
    stack: Endpoints, unique: Unique, name: str
) -> tuple[str, str, str, dict[str, str], str]:
    """The test's keyspace, topic and schema, a worker's settings with a DLQ topic of its own
    (returned last), once a worker has applied ROW and KEPT[0]."""
    keyspace, topic, schema = await prepare(stack, unique, name)
    dlq_topic = unique("dlq-events")
    settings = {"gdpr__hash_key": HASH_KEY, "dlq__topic": dlq_topic}
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, **settings)
    first = [schemaless_record(insert(k, TS, 1), keyspace) for k in (ROW, KEPT[0])]
    await produce(stack.kafka, topic, first)
    await run_worker(env)
    return keyspace, topic, schema, env, dlq_topic


async def marker_applied(dsn: str, schema: str) -> None:
    """Wait until MARKER, produced last, is in PostgreSQL: the worker went on past the rest."""
    async with asyncio.timeout(120):
        while MARKER not in await keys_in(dsn, schema):
            await asyncio.sleep(0.2)


@pytest.mark.timeout(600)
async def test_poison_records_of_an_erased_key_are_skipped_not_dead_lettered(
    stack: Endpoints, unique: Unique, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a row is erased, poison records of its key (one on the topic, one replayed with
    `dlq replay` from a dead letter stored after the erasure) get no `_cdc_dlq_records` row
    and no DLQ topic record: the worker moves past them, counts them in
    cdc_erasure_suppressed_total{path="dead_letter"} and logs `dead_letter_erased` without the
    key; the same poison of a key not erased is dead-lettered as before."""
    keyspace, topic, schema, env, dlq_topic = await applied_with_dlq(stack, unique, "gdprpoison")
    dsn = stack.postgres_dsn
    record = lambda m: schemaless_record(m, keyspace)  # noqa: E731
    kept = KEPT[0]
    erased = run_cli(env, "gdpr", "erase", "--table", TARGET, "--key", key_arg(ROW))
    assert erased.returncode == 0, erased.stderr
    # A dead letter of the key the erasure did not see (stored after it), replayed.
    stale = await dead_letter(dsn, schema, topic, 10**9, out_of_range(ROW, TS + 1), keyspace)
    replayed = run_cli(env, "dlq", "replay", str(stale))
    assert replayed.returncode == 0, replayed.stderr
    poison = [out_of_range(ROW, TS + 2), out_of_range(kept, TS + 2)]
    offsets = await produce_positions(
        stack.kafka, topic, [record(m) for m in (*poison, insert(MARKER, TS, 1))]
    )
    logs = structlog.testing.LogCapture()
    capturing = structlog.wrap_logger(
        structlog.PrintLogger(), processors=[logs], wrapper_class=structlog.BoundLogger
    )
    monkeypatch.setattr(applier, "log", capturing)
    async with running(env) as worker:
        await marker_applied(dsn, schema)
        skipped = suppressed(worker, "dead_letter")
    assert await keys_in(dsn, schema) == {kept, MARKER}
    row_key, _ = record(poison[0])
    kept_key, _ = record(poison[1])
    assert await letters_of(dsn, schema) == [(10**9, row_key), (offsets[1][1], kept_key)]
    in_topic = await read_topic(stack.kafka, dlq_topic)
    assert [r.key for r in in_topic] == [kept_key]
    assert skipped == 2
    logged = [line for line in logs.entries if line["event"] == "dead_letter_erased"]
    # The replayed record went to the topic just before the poison produced after it.
    assert sorted(line["offset"] for line in logged) == [offsets[0][1] - 1, offsets[0][1]]
    assert all(line["table"] == TARGET and "erase-me" not in json.dumps(line) for line in logged)


@pytest.mark.timeout(600)
async def test_dead_letter_of_a_key_erased_while_its_batch_waits_is_not_kept(
    stack: Endpoints, unique: Unique
) -> None:
    """A poison record whose key is erased after the worker looked it up (its DLQ message is
    sent) but before its transaction took the key's locks: the transaction, once the erasure
    has committed, sees the entry under the locks and stores no `_cdc_dlq_records` row; the
    record counts as skipped and the worker goes on."""
    keyspace, topic, schema, env, dlq_topic = await applied_with_dlq(stack, unique, "gdprrace")
    dsn = stack.postgres_dsn
    record = lambda m: schemaless_record(m, keyspace)  # noqa: E731
    async with running(env) as worker:
        holder = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            # What an erasure holds while it commits (the table's lock, taken exclusively as
            # for a table whose partition key is unknown, excludes the writer whatever it knows).
            erasing = holder.transaction()
            await erasing.start()
            await holder.execute("SELECT pg_advisory_xact_lock($1)", lock_id(TARGET))
            poison = record(out_of_range(ROW, TS + 1))
            await produce(stack.kafka, topic, [poison, record(insert(MARKER, TS, 1))])
            async with asyncio.timeout(120):
                while not await sql(
                    dsn,
                    schema,
                    "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    holder.get_server_pid(),
                ):
                    await asyncio.sleep(0.05)  # until the batch's transaction waits for us
            digest = key_hash(Secret(HASH_KEY), TARGET, ROW_SCOPE, json_key(ROW))
            await holder.execute(
                "WITH e AS (INSERT INTO _cdc_erasures (target_table, scope, key_hash, "
                "requested_by) VALUES ($1, 'row', $2, 'test') RETURNING id) "
                "INSERT INTO _cdc_erased_keys (target_table, scope, key_hash, erasure_id) "
                "SELECT $1, 'row', $2, id FROM e",
                TARGET,
                digest,
            )
            await erasing.commit()
        finally:
            await holder.close()
        await marker_applied(dsn, schema)
        skipped = suppressed(worker, "dead_letter")
    assert await letters_of(dsn, schema) == []
    assert skipped == 1
    # Sent before the erasure, the DLQ message stays in the DLQ topic until its retention.
    assert [r.key for r in await read_topic(stack.kafka, dlq_topic)] == [poison[0]]


@pytest.mark.timeout(600)
async def test_reconciliation_counts_the_erased_keys_it_leaves_out(
    stack: Endpoints, unique: Unique
) -> None:
    """Cassandra still holds an erased row: a checksum job the worker runs (POST
    /reconciliation/jobs) reports no mismatch for it and counts it in the worker's
    cdc_erasure_suppressed_total{path="reconciliation"}, which /metrics shows; a repair of a
    mismatch of the key recorded across the erasure drops it and counts it (RepairSummary's
    `erased` and the metric), and `reconcile repair` prints the count."""
    keyspace, topic, schema = await prepare(stack, unique, "gdprrecon")
    write_cassandra(stack, keyspace)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, gdpr__hash_key=HASH_KEY)
    dsn = stack.postgres_dsn
    record = lambda m: schemaless_record(m, keyspace)  # noqa: E731
    await produce(stack.kafka, topic, [record(insert(k, TS, 1)) for k in (*ROWS, MARKER)])
    await run_worker(env)
    erased = run_cli(env, "gdpr", "erase", "--table", TARGET, "--key", key_arg(ROW))
    assert erased.returncode == 0, erased.stderr

    async with running(env) as worker:
        assert worker.http is not None
        assert worker.probes is not None
        body = {"table": TARGET, "strategy": "checksum"}
        status, _, job = await asyncio.to_thread(
            call, worker.http.port, "POST", "/reconciliation/jobs", None, body
        )
        assert status == 202, job
        async with asyncio.timeout(120):
            while job["status"] in ("pending", "running"):
                await asyncio.sleep(0.2)
                _, _, job = await asyncio.to_thread(
                    call, worker.http.port, "GET", f"/reconciliation/jobs/{job['id']}"
                )
        counted = suppressed(worker, "reconciliation")
        scraped = await asyncio.to_thread(http_get, worker.probes.port, "/metrics")
    assert (job["status"], job["mismatches"]) == ("succeeded", 0)
    assert counted == 1
    assert (
        f'cdc_erasure_suppressed_total{{path="reconciliation",table="{TARGET}"}} 1.0' in scraped[1]
    )

    # A job that found the row missing before the erasure recorded it after.
    await mismatch(dsn, schema, job["id"], ROW, "missing_in_postgres")
    async with reconciler_on(stack, schema) as bare:
        metrics = ReconMetrics()
        rec = Reconciler(
            bare.pool,
            schema,
            bare.session,
            bare.settings,
            metrics=metrics,
            pushgateway_url=None,
            owner="test",
            suppression=Suppression(Secret(HASH_KEY)),
        )
        summary = await rec.repair(job["id"])
    assert (summary.repaired, summary.erased) == (0, 1)
    repaired = metrics.registry.get_sample_value(
        "cdc_erasure_suppressed_total", {"table": TARGET, "path": "reconciliation"}
    )
    assert repaired == 1
    await mismatch(dsn, schema, job["id"], ROW, "missing_in_postgres")
    repair = run_cli(env, "reconcile", "repair", "--job", str(job["id"]))
    assert repair.returncode == 0, repair.stderr
    assert "erased keys left out 1" in repair.stdout
    assert await keys_in(dsn, schema) == set(ROWS) - {ROW} | {MARKER}
    assert await sql(dsn, schema, "SELECT 1 FROM _cdc_reconciliation_mismatches") == []
