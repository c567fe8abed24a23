"""The dead-letter queue against the real stack: poison of every kind among good events, the
DLQ share limit pausing a partition, and replay once the cause is fixed."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from cdc_sink.app import SinkApp
from cdc_sink.config import load_config
from cdc_sink.ops.audit import cli_actor
from tests.support.cassandra_model import Mutation
from tests.support.names import Unique
from tests.support.pipeline import (
    create_cassandra_model_table,
    create_topic,
    kafka_offsets,
    produce_positions,
    read_topic,
    run_cli,
    run_worker,
    schemaless_record,
    sink_env,
    sql,
)
from tests.support.stack import Endpoints

TS = 1_900_000_000_000_000
Record = tuple[bytes | None, bytes | None]


def good_mutation(i: int) -> Mutation:
    """The i-th good event: an INSERT of a row no other good event touches (v3 is never 13)."""
    key = (i % 2, f"p{i // 12}", (i // 2) % 3, ("x", "y")[(i // 6) % 2])
    cells = {"v1": (i % 1000, None), "v2": (f"s{i}", None), "v3": (14 + i % 997, None)}
    return Mutation("insert", TS + i, key, cells)


def expected_row(m: Mutation) -> tuple[Any, ...]:
    return (*m.key, *(m.cells[c][0] for c in ("v1", "v2", "v3")))


def poison_insert(j: int, keyspace: str, **cells: Any) -> Record:
    """An INSERT of a row of its own (p2 = poison<j>) whose cells are bad as given."""
    m = Mutation("insert", TS, (0, f"poison{j}", 0, "x"), {c: (v, None) for c, v in cells.items()})
    return schemaless_record(m, keyspace)


def poison(kind: str, j: int, keyspace: str) -> Record:
    """A record that can never be applied, of the given kind."""
    key, _ = poison_insert(j, keyspace, v1=1)
    if kind == "undecodable":
        return key, b"\xff\xfe" + random.randbytes(40)
    if kind == "unknown_schema_id":
        return key, b"\x00" + (0x7FFF_FFF0 - j % 3).to_bytes(4, "big") + b"\x02\x06abc"
    if kind == "invalid_json":
        return key, b'{"schema": {"type": "struct", "fields": ['
    if kind == "not_an_event":
        return key, json.dumps({"hello": "world", "n": j}).encode()
    if kind == "bad_expiry":
        key, value = poison_insert(j, keyspace, v1=1)
        envelope = json.loads(value)
        envelope["after"]["v1"]["deletion_ts"] = f"tomorrow {j}"
        return key, json.dumps(envelope).encode()
    if kind == "unusable_schema":
        # JsonConverter with schemas, for a column the table lacks, of a type nobody knows
        key, value = poison_insert(j, keyspace, v1=1)
        payload = json.loads(value)
        payload["after"]["v9"] = {"value": j, "deletion_ts": None, "set": True}
        cell = {"type": "struct", "field": "v9", "fields": [{"type": "int65", "field": "value"}]}
        after = {"type": "struct", "field": "after", "fields": [cell]}
        envelope = {"schema": {"type": "struct", "fields": [after]}, "payload": payload}
        return key, json.dumps(envelope).encode()
    if kind == "out_of_range":
        return poison_insert(j, keyspace, v1=3_000_000_000 + j)
    if kind == "type_changed":
        return poison_insert(j, keyspace, v1=f"not-a-number-{j}")
    if kind == "nul_in_text":
        return poison_insert(j, keyspace, v2=f"a\x00b{j}")
    if kind == "constraint":
        return poison_insert(j, keyspace, v3=13)
    raise AssertionError(kind)


# kind -> (error class, stage) the DLQ must record
POISON_KINDS = {
    "undecodable": ("DecodeError", "decode"),
    "unknown_schema_id": ("DecodeError", "decode"),
    "invalid_json": ("DecodeError", "decode"),
    "not_an_event": ("EventError", "interpret"),
    "bad_expiry": ("EventError", "interpret"),
    "unusable_schema": ("EventError", "interpret"),
    "out_of_range": ("ConversionError", "convert"),
    "type_changed": ("ConversionError", "convert"),
    "nul_in_text": ("ConversionError", "convert"),
    "constraint": ("CheckViolationError", "write"),
}


async def add_constraint(dsn: str, schema: str) -> None:
    """What a DBA might add: v3 may never be 13."""
    await sql(
        dsn, schema, "ALTER TABLE cdc_model ADD CONSTRAINT no_13 CHECK (v3 IS DISTINCT FROM 13)"
    )


def counter_total(worker: SinkApp, name: str) -> float:
    return sum(
        sample.value
        for family in worker.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    )


async def test_one_percent_poison_of_every_kind_is_dead_lettered_and_nothing_else(
    stack: Endpoints, unique: Unique
) -> None:
    """100,000 records, ~1 % poison of ten kinds: every good event is applied, every poison
    record is in the DLQ topic (with its context headers and original bytes) and in
    `_cdc_dlq_records` with the right class and stage, and consumed = applied + dead-lettered;
    the worker never stops."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("poison")
    topic = unique("cdc-events-poison")
    dlq_topic = unique("dlq-events")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, dlq__topic=dlq_topic)
    good = [good_mutation(i) for i in range(99_000)]
    kinds = list(POISON_KINDS)
    records: list[Record] = []
    poisoned: dict[int, tuple[str, Record]] = {}  # index in `records` -> (kind, record)
    for i, m in enumerate(good[1:]):
        if i % 99 == 0:  # 1,000 of them, one before every 99 good events
            kind = kinds[len(poisoned) % len(kinds)]
            poisoned[len(records)] = (kind, poison(kind, len(poisoned), keyspace))
            records.append(poisoned[len(records)][1])
        records.append(schemaless_record(m, keyspace))
    # the first event creates the table; then a constraint the poison will break
    first = await produce_positions(stack.kafka, topic, [schemaless_record(good[0], keyspace)])
    workers = [await run_worker(env)]
    await add_constraint(stack.postgres_dsn, schema)
    positions = await produce_positions(stack.kafka, topic, records)
    workers.append(await run_worker(env))

    total = len(first) + len(positions)
    assert total == 100_000
    assert len(poisoned) == 1_000
    where = {positions[i]: kind for i, (kind, _) in poisoned.items()}
    sent = {positions[i]: record for i, (_, record) in poisoned.items()}

    stored = await sql(stack.postgres_dsn, schema, "SELECT sum(next_offset) FROM _cdc_checkpoints")
    assert stored[0][0] == total
    rows = await sql(stack.postgres_dsn, schema, "SELECT p1, p2, c1, c2, v1, v2, v3 FROM cdc_model")
    assert sorted(tuple(r) for r in rows) == sorted(expected_row(m) for m in good)

    letters = await sql(
        stack.postgres_dsn,
        schema,
        "SELECT source_topic, source_partition, source_offset, error_class, stage, "
        "record_key, record_value, status FROM _cdc_dlq_records",
    )
    assert {(r["source_partition"], r["source_offset"]) for r in letters} == set(where)
    assert len(letters) == len(where)
    for r in letters:
        position = (r["source_partition"], r["source_offset"])
        assert (r["error_class"], r["stage"]) == POISON_KINDS[where[position]], r
        assert (r["record_key"], r["record_value"]) == sent[position]
        assert (r["source_topic"], r["status"]) == (topic, "pending")

    in_topic = await read_topic(stack.kafka, dlq_topic)
    seen = set()
    for message in in_topic:
        headers = {k: v.decode() for k, v in message.headers}
        position = (int(headers["cdc.source.partition"]), int(headers["cdc.source.offset"]))
        seen.add(position)
        assert headers["cdc.source.topic"] == topic
        assert (headers["cdc.error.class"], headers["cdc.error.stage"]) == POISON_KINDS[
            where[position]
        ]
        assert headers["cdc.error.message"]
        assert headers["cdc.failed.at"]
        assert (message.key, message.value) == sent[position]
    assert seen == set(where)

    applied = sum(counter_total(w, "cdc_events_processed_total") for w in workers)
    dead = sum(counter_total(w, "cdc_dlq_records_total") for w in workers)
    assert (applied, dead) == (len(good), len(poisoned))
    assert sum(w.applied_events for w in workers) == total == applied + dead


async def wait_until(check: Callable[[], Any]) -> None:
    async with asyncio.timeout(90):
        while not await check():
            await asyncio.sleep(0.2)


def http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def checkpoints(dsn: str, schema: str) -> dict[int, int]:
    """Stored next offsets by partition ({} before the worker has created its tables)."""
    exists = await sql(dsn, schema, "SELECT to_regclass('_cdc_checkpoints') IS NOT NULL")
    if not exists[0][0]:
        return {}
    rows = await sql(dsn, schema, "SELECT kafka_partition, next_offset FROM _cdc_checkpoints")
    return {r[0]: r[1] for r in rows}


async def test_a_partition_past_the_dlq_share_pauses_and_the_others_go_on(
    stack: Endpoints, unique: Unique
) -> None:
    """150 bad records in a row on one partition (limit: 10 % of 1000) pause that partition
    after its good prefix, dead-letter none of them, raise the metrics, and leave the other
    partitions running; resuming re-checks from the checkpoint (and pauses again); a worker
    allowed a larger share then dead-letters them and applies the rest."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("limit")
    topic = unique("cdc-events-limit")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    settings = {"dlq__topic": unique("dlq-events"), "dlq__max_share": "0.1"}
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, **settings)
    good = iter(schemaless_record(good_mutation(i), keyspace) for i in range(10_000))
    for partition in range(8):
        await produce_positions(stack.kafka, topic, [next(good) for _ in range(50)], partition)
    bad = [poison("undecodable", j, keyspace) for j in range(150)]
    await produce_positions(stack.kafka, topic, [*bad, *(next(good) for _ in range(20))], 0)

    worker = SinkApp(load_config(env))
    task = asyncio.create_task(worker.run())
    try:

        async def others_done() -> bool:
            done = await checkpoints(stack.postgres_dsn, schema)
            return (
                len(done) == 8
                and all(done[p] == 50 for p in range(1, 8))
                and bool(worker.worker.paused)
            )

        await wait_until(others_done)
        assert (await checkpoints(stack.postgres_dsn, schema))[0] == 50  # the good prefix
        assert worker.worker.paused == {TopicPartition(topic, 0)}
        assert (
            worker.metrics.registry.get_sample_value(
                "cdc_dlq_partition_paused", {"topic": topic, "partition": "0"}
            )
            == 1
        )
        limit_trips = {"stage": "dlq", "kind": "limit"}
        assert worker.metrics.registry.get_sample_value("cdc_errors_total", limit_trips) == 1
        assert not await sql(stack.postgres_dsn, schema, "SELECT 1 FROM _cdc_dlq_records")

        assert worker.http is not None
        status, body = await asyncio.to_thread(
            http, worker.http.port, "POST", "/dlq/resume", {"topic": topic}
        )
        assert (status, body) == (200, {"resumed": [f"{topic}[0]"]})

        async def tripped_again() -> bool:
            return worker.metrics.registry.get_sample_value("cdc_errors_total", limit_trips) == 2

        await wait_until(tripped_again)
        assert (await checkpoints(stack.postgres_dsn, schema))[0] == 50
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)

    lenient = {**env, "CDC_DLQ__MAX_SHARE": "1"}
    await run_worker(lenient)
    assert (await checkpoints(stack.postgres_dsn, schema))[0] == 220
    letters = await sql(stack.postgres_dsn, schema, "SELECT count(*) FROM _cdc_dlq_records")
    assert letters[0][0] == 150
    rows = await sql(stack.postgres_dsn, schema, "SELECT count(*) FROM cdc_model")
    assert rows[0][0] == 8 * 50 + 20


async def test_kafka_is_told_the_offset_past_a_record_postgresql_refused(
    stack: Endpoints, unique: Unique
) -> None:
    """A record PostgreSQL refuses, the last of its partition, is dead-lettered alone: its
    checkpoint move reaches Kafka too, so lag tooling shows the partition caught up, not one
    record behind until the next event."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("lag")
    topic, group = unique("cdc-events-lag"), unique("g")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, partitions=1)
    env = sink_env(stack, topic=topic, group=group, schema=schema, dlq__topic=unique("dlq"))
    await produce_positions(stack.kafka, topic, [schemaless_record(good_mutation(0), keyspace)])
    await run_worker(env)  # creates the table
    await add_constraint(stack.postgres_dsn, schema)
    later = [schemaless_record(good_mutation(i), keyspace) for i in range(1, 5)]
    await produce_positions(stack.kafka, topic, [*later, poison("constraint", 0, keyspace)])
    await run_worker(env)
    assert (await checkpoints(stack.postgres_dsn, schema))[0] == 6
    letters = await sql(stack.postgres_dsn, schema, "SELECT stage FROM _cdc_dlq_records")
    assert [r["stage"] for r in letters] == ["write"]
    assert await kafka_offsets(stack.kafka, group) == {0: 6}


async def test_headers_without_a_value_reach_the_dlq_as_they_were(
    stack: Endpoints, unique: Unique
) -> None:
    """Kafka allows a header with no value; a poison record carrying one is dead-lettered
    (this stopped the worker once) with the header kept as such in the topic and the table."""
    topic, schema, dlq_topic = unique("cdc-events-hdr"), unique.schema("hdr"), unique("dlq-events")
    await create_topic(stack.kafka, topic, partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, acks="all")
    await producer.start()
    try:
        headers = [("no-value", None), ("trace", b"t-1")]
        await producer.send_and_wait(topic, b"\xff\xfe not a record", key=b"k", headers=headers)
    finally:
        await producer.stop()
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, dlq__topic=dlq_topic)
    env["CDC_DLQ__MAX_SHARE"] = "1"  # the only record is poison
    worker = await run_worker(env)
    assert worker.applied_events == 1
    [message] = await read_topic(stack.kafka, dlq_topic)
    assert list(message.headers[:2]) == headers
    stored = await sql(stack.postgres_dsn, schema, "SELECT headers FROM _cdc_dlq_records")
    assert json.loads(stored[0][0])[:2] == [
        {"key": "no-value", "value": None},
        {"key": "trace", "value": "t-1"},
    ]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, "dlq", *args, timeout=120)


async def test_replayed_records_apply_once_the_cause_is_fixed(
    stack: Endpoints, unique: Unique
) -> None:
    """Records refused by a constraint are dead-lettered; `dlq list/show` and GET /dlq show
    them; after the constraint is dropped, `dlq replay ID` and POST /dlq/replay send them back
    and the running worker applies them; they are marked replayed and audited."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("replay")
    topic = unique("cdc-events-replay")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    env = sink_env(
        stack, topic=topic, group=unique("g"), schema=schema, dlq__topic=unique("dlq-events")
    )
    worker = SinkApp(load_config(env))
    task = asyncio.create_task(worker.run())

    async def applied(count: int) -> None:
        async def check() -> bool:
            return sum((await checkpoints(stack.postgres_dsn, schema)).values()) >= count

        await wait_until(check)

    try:
        await produce_positions(stack.kafka, topic, [schemaless_record(good_mutation(0), keyspace)])
        await applied(1)
        await add_constraint(stack.postgres_dsn, schema)
        refused = [poison("constraint", j, keyspace) for j in range(3)]
        await produce_positions(
            stack.kafka, topic, [*refused, schemaless_record(good_mutation(1), keyspace)]
        )
        await applied(5)
        assert worker.http is not None
        port = worker.http.port

        listed = await asyncio.to_thread(cli, env, "list")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("write/CheckViolationError") == 3
        status, body = await asyncio.to_thread(http, port, "GET", "/dlq?status=pending")
        assert status == 200
        assert len(body["records"]) == 3
        ids = [r["id"] for r in body["records"]]
        shown = await asyncio.to_thread(cli, env, "show", str(ids[0]))
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["record_value_text"].find('"v3"') >= 0
        status, one = await asyncio.to_thread(http, port, "GET", f"/dlq/{ids[0]}")
        assert status == 200
        assert one["error_class"] == "CheckViolationError"

        # failure paths: unknown id, bad id, no selection
        assert (await asyncio.to_thread(cli, env, "show", "987654321")).returncode == 1
        assert (await asyncio.to_thread(cli, env, "replay")).returncode == 2
        assert (await asyncio.to_thread(http, port, "GET", "/dlq/987654321"))[0] == 404
        assert (await asyncio.to_thread(http, port, "GET", "/dlq/abc"))[0] == 400
        for bad in (f"/dlq/{2**64}", "/dlq?limit=-1", "/dlq?limit=1001", f"/dlq?after_id={2**64}"):
            status, body = await asyncio.to_thread(http, port, "GET", bad)
            assert (status, "must be between" in body["error"]) == (400, True), (bad, body)
        status, body = await asyncio.to_thread(http, port, "POST", "/dlq/replay", {"ids": [2**64]})
        assert (status, "ids must be between" in body["error"]) == (400, True), body
        assert (await asyncio.to_thread(http, port, "GET", "/dlq?colour=red"))[0] == 400
        assert (await asyncio.to_thread(http, port, "POST", "/dlq/replay", {}))[0] == 400

        await sql(stack.postgres_dsn, schema, "ALTER TABLE cdc_model DROP CONSTRAINT no_13")
        replayed = await asyncio.to_thread(cli, env, "replay", str(ids[0]))
        assert replayed.returncode == 0, replayed.stderr
        assert f"replayed 1 record(s): {ids[0]}" in replayed.stdout
        status, body = await asyncio.to_thread(
            http, port, "POST", "/dlq/replay", {"filter": {"error_class": "CheckViolationError"}}
        )
        assert (status, sorted(body["replayed"])) == (200, sorted(ids[1:]))
        # already replayed: nothing is sent twice
        status, body = await asyncio.to_thread(http, port, "POST", "/dlq/replay", {"ids": ids})
        assert (status, body) == (200, {"replayed": []})

        async def landed() -> bool:
            rows = await sql(
                stack.postgres_dsn, schema, "SELECT count(*) FROM cdc_model WHERE v3 = 13"
            )
            return rows[0][0] == 3

        await wait_until(landed)
        states = await sql(
            stack.postgres_dsn,
            schema,
            "SELECT status, replayed_at IS NOT NULL FROM _cdc_dlq_records ORDER BY id",
        )
        assert [tuple(s) for s in states] == [("replayed", True)] * 3
        audit = await sql(
            stack.postgres_dsn,
            schema,
            "SELECT actor, details FROM _cdc_audit_log WHERE action = 'dlq_replay' ORDER BY id",
        )
        assert [(a["actor"], json.loads(a["details"])["ids"]) for a in audit] == [
            (cli_actor(), [ids[0]]),
            ("anonymous", sorted(ids[1:])),
        ]
        status, body = await asyncio.to_thread(http, port, "GET", "/dlq?status=replayed")
        assert status == 200
        assert len(body["records"]) == 3
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
