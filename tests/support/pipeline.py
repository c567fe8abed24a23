"""Helpers for tests that run the whole pipeline: Kafka topic → cdc-sink worker → PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import WhiteListRoundRobinPolicy

from cdc_sink.app import SinkApp
from cdc_sink.config import load_config
from tests.support.cassandra_model import (
    C1,
    C2,
    KEY,
    P1,
    SCALARS,
    Mutation,
    to_envelope,
)
from tests.support.stack import REPO, Endpoints

MODEL_CQL = (
    "CREATE TABLE {ks}.model (p1 int, p2 text, c1 int, c2 text, v1 int, v2 text, v3 int, "
    "v4 set<int>, v5 frozen<list<int>>, "
    "PRIMARY KEY ((p1, p2), c1, c2)) WITH cdc = true"
)


def create_cassandra_model_table(stack: Endpoints, keyspace: str) -> None:
    """The Cassandra table the events come from, so the sink can read its real column types."""
    create_cassandra_table(stack, keyspace, MODEL_CQL.format(ks=keyspace))


def create_cassandra_table(stack: Endpoints, keyspace: str, cql: str) -> None:
    """Create `keyspace` (if need be) and run `cql` (a CREATE TABLE in it) on the stack's
    Cassandra."""
    execute_cql(
        stack,
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        cql,
    )


def cassandra_session(stack: Endpoints) -> Session:
    """A session on the stack's Cassandra node alone (close it with session.cluster.shutdown)."""
    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy([stack.cassandra_host]),
        request_timeout=120,
    )
    user = stack.get("CDC_CASSANDRA__USERNAME")
    cluster = Cluster(
        [stack.cassandra_host],
        port=stack.cassandra_port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        protocol_version=5,
        auth_provider=(
            PlainTextAuthProvider(user, stack["CDC_CASSANDRA__PASSWORD"]) if user else None
        ),
    )
    return cluster.connect()


def execute_cql(stack: Endpoints, *statements: str) -> None:
    """Run CQL statements in order on the stack's Cassandra node (DDL waits for agreement)."""
    session = cassandra_session(stack)
    try:
        for statement in statements:
            session.execute(statement)
    finally:
        session.cluster.shutdown()


def schemaless_record(m: Mutation, keyspace: str, table: str = "model") -> tuple[bytes, bytes]:
    """The mutation as JsonConverter writes it with schemas.enable=false."""
    key, value = to_envelope(m)
    value["source"].update(keyspace=keyspace, table=table)
    return json.dumps(key).encode(), json.dumps(value).encode()


async def create_topic(
    bootstrap: str, topic: str, partitions: int = 8, configs: dict[str, str] | None = None
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, partitions, replication_factor=1, topic_configs=configs or {})]
        )
    finally:
        await admin.close()
    await asyncio.sleep(0.5)  # let the new partitions elect their leader


async def kafka_offsets(bootstrap: str, group: str) -> dict[int, int]:
    """The offsets the group committed to Kafka, by partition (-1: none yet)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in committed.items()}


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]]) -> int:
    """Produce every record (acks=all) and wait for all of them; return how many."""
    return len(await produce_positions(bootstrap, topic, records))


async def produce_positions(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    partition: int | None = None,
) -> list[tuple[int, int]]:
    """Produce every record (acks=all, to `partition` or by key) and return each one's
    (partition, offset), in order."""
    return await produce_placed(bootstrap, topic, ((partition, k, v) for k, v in records))


async def produce_placed(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[int | None, bytes | None, bytes | None]],
    *,
    max_request_size: int = 1_048_576,
) -> list[tuple[int, int]]:
    """Produce every (partition or None for by key, key, value) record (acks=all) and return
    each one's (partition, offset), in order. Records above 1 MiB need a larger
    `max_request_size` and a topic whose max.message.bytes allows them."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=256 * 1024,
        max_request_size=max_request_size,
    )
    await producer.start()
    try:
        pending = [
            await producer.send(topic, value, key=key, partition=partition)
            for partition, key, value in records
        ]
        sent = await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return [(meta.partition, meta.offset) for meta in sent]


def sink_env(
    stack: Endpoints, *, topic: str, group: str, schema: str, **settings: str
) -> dict[str, str]:
    """CDC_* settings for a worker on this stack, isolated by topic, group and schema."""
    env = {k: v for k, v in stack.values.items() if k.startswith("CDC_") and "__" in k}
    env.update(
        {
            "CDC_KAFKA__TOPIC_PATTERN": f"^{topic}$",
            "CDC_KAFKA__GROUP_ID": group,
            "CDC_POSTGRES__SCHEMA": schema,
            "CDC_HTTP__PORT": "0",
            "CDC_API__PORT": "0",
            "CDC_LOG__LEVEL": "warning",
        }
    )
    env.update({f"CDC_{k.upper()}": v for k, v in settings.items()})
    return env


async def run_worker(env: Mapping[str, str]) -> SinkApp:
    """Run one worker in this process until it has applied everything produced so far."""
    worker = SinkApp(load_config(env), stop_when_caught_up=True)
    async with asyncio.timeout(300):
        await worker.run()
    return worker


def run_cli(
    env: Mapping[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m cdc_sink ARGS` of this checkout with these settings; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "cdc_sink", *args],
        env={**os.environ, **env, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_worker_process(
    env: Mapping[str, str],
    log_path: Path,
    *,
    stop_when_caught_up: bool = True,
    address_space: int | None = None,
) -> subprocess.Popen[bytes]:
    """`python -m cdc_sink run` as a separate process (so it can be killed with SIGKILL);
    `address_space` caps its virtual memory (bytes), so a runaway allocation fails there."""
    full = {**os.environ, **env, "PYTHONPATH": str(REPO / "src")}
    until = ["--stop-when-caught-up"] if stop_when_caught_up else []

    def cap() -> None:
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cdc_sink", "run", *until],
            env=full,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=cap,  # only setrlimit: safe between fork and exec
        )


def kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def read_rows(dsn: str, schema: str, table: str, columns: Iterable[str]) -> dict[Any, Any]:
    """Every row of schema.table as {key tuple: {column: value}}."""
    cols = list(columns)
    conn = await asyncpg.connect(dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}"."{table}"')
        if not exists:
            return {}
        rows = await conn.fetch(f'SELECT {", ".join(KEY + tuple(cols))} FROM "{schema}"."{table}"')
    finally:
        await conn.close()
    return {tuple(r[k] for k in KEY): {c: r[c] for c in cols} for r in rows}


async def applied(dsn: str, schema: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        exists = await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", f'"{schema}"._cdc_checkpoints'
        )
        if not exists:
            return 0
        return int(
            await conn.fetchval(
                f'SELECT coalesce(sum(next_offset), 0) FROM "{schema}"._cdc_checkpoints'
            )
        )
    finally:
        await conn.close()


async def wait_for_applied(
    dsn: str, schema: str, more_than: int, worker: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll the stored checkpoints until they pass `more_than` (or the worker exits)."""
    while True:
        if await applied(dsn, schema) > more_than or (worker and worker.poll() is not None):
            return
        await asyncio.sleep(0.05)


async def fetch_rows(dsn: str, schema: str, query: str) -> list[asyncpg.Record]:
    """The rows of `query`, run in `schema` on a connection of its own."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


async def fetch_value(dsn: str, query: str, *args: Any) -> Any:
    """The first column of the first row of `query`, on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def sql(dsn: str, schema: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run `query` with `schema` first on the search path; its rows."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON log lines in a worker's output (other lines skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def listening_port(log_text: str, listener: str = "api") -> int | None:
    """The port a worker's `listener` ("api": the control API; "probes": /health, /ready,
    /metrics) is bound to, from its `http_listening` log line; None before it is logged."""
    ports = [
        int(line["port"])
        for line in json_lines(log_text)
        if line.get("event") == "http_listening" and line.get("listener") == listener
    ]
    return ports[0] if ports else None


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET a worker's HTTP API on loopback: status and body (errors included)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


Record = tuple[bytes | None, bytes | None]
Expected = tuple[Record, str, str, tuple[str, ...]]
"""A record expected in the DLQ: its bytes, error class, stage, and words its message holds."""


async def assert_outcome(
    dsn: str,
    schema: str,
    positions: Mapping[Any, tuple[int, int]],
    dead: Mapping[Any, Expected],
) -> None:
    """Every produced record (`positions`: its partition and offset, by any name) is past the
    checkpoints, and exactly the `dead` ones are in `_cdc_dlq_records`, each with its original
    key and value, its error class and stage, and a message holding each expected fragment."""
    [applied] = await fetch_rows(dsn, schema, "SELECT sum(next_offset) FROM _cdc_checkpoints")
    letters = await fetch_rows(
        dsn,
        schema,
        "SELECT source_partition, source_offset, error_class, stage, error_message, "
        "record_key, record_value FROM _cdc_dlq_records",
    )
    assert applied[0] == len(positions)
    at = {(r["source_partition"], r["source_offset"]): r for r in letters}
    assert sorted(at) == sorted(positions[name] for name in dead)
    for name, (sent, error_class, stage, fragments) in dead.items():
        letter = at[positions[name]]
        assert (letter["record_key"], letter["record_value"]) == sent, name
        assert (letter["error_class"], letter["stage"]) == (error_class, stage), name
        for fragment in fragments:
            assert fragment in letter["error_message"], (name, letter["error_message"])


async def dead_letters(dsn: str, schema: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}"._cdc_dlq_records'))
    finally:
        await conn.close()


async def topic_partitions(bootstrap: str, topic: str) -> list[TopicPartition]:
    """The topic's partitions as the broker describes them (none while it does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return [TopicPartition(topic, p["partition"]) for p in described["partitions"]]


async def read_topic(
    bootstrap: str, topic: str, since: Mapping[int, int] | None = None
) -> list[Any]:
    """Every record of `topic` up to the end offsets seen now, from the offset `since` gives
    a partition (by its number), else from the beginning."""
    partitions = await topic_partitions(bootstrap, topic)
    if not partitions:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        for tp in partitions:
            if since and tp.partition in since:
                consumer.seek(tp, since[tp.partition])
        ends = await consumer.end_offsets(partitions)
        records: list[Any] = []
        async with asyncio.timeout(60):
            while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def drop_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def random_history(rng: random.Random, count: int, keys: int, base_ts: int) -> list[Mutation]:
    """A plain-random history over `keys` rows (for streams too long for Hypothesis)."""
    partitions = [(p1, f"p{i}") for i in range(max(1, keys // 6)) for p1 in P1]
    mutations: list[Mutation] = []

    def value(column: str) -> Any:
        n = rng.randrange(1000)
        return f"s{n}" if column == "v2" else n

    for i in range(count):
        ts = base_ts + i * 10 + rng.randrange(10)
        partition = rng.choice(partitions)
        key = (*partition, rng.choice(C1), rng.choice(C2))
        roll = rng.random()
        if roll < 0.5:
            cells = {c: (value(c), None) for c in rng.sample(SCALARS, rng.randint(1, 3))}
            mutations.append(Mutation("insert", ts, key, cells))
        elif roll < 0.85:
            cells = {
                c: (rng.choice([None, value(c)]), None)
                for c in rng.sample(SCALARS, rng.randint(1, 3))
            }
            mutations.append(Mutation("update", ts, key, cells))
        elif roll < 0.95:
            mutations.append(Mutation("delete_row", ts, key))
        elif roll < 0.98:
            start = (rng.choice(C1),)
            mutations.append(
                Mutation("delete_range", ts, partition, {}, start, rng.random() < 0.5, (), True)
            )
        else:
            mutations.append(Mutation("delete_partition", ts, partition))
    return mutations


def json_with_schema(
    keyspace: str,
    table: str,
    columns: Mapping[str, str | Mapping[str, Any]],
    key: Mapping[str, Any],
    cells: Mapping[str, Any],
    *,
    op: str = "i",
    ts_us: int = 1_900_000_000_000_000,
) -> tuple[bytes, bytes]:
    """A record as JsonConverter writes it with schemas.enable=true; `columns` maps each
    column to its Connect type name (int32, string, …) or whole Connect schema, and lists key
    columns first."""

    def field(name: str, schema: Mapping[str, Any]) -> dict[str, Any]:
        return {"field": name, **schema}

    def optional(kind: str | Mapping[str, Any]) -> dict[str, Any]:
        return {**({"type": kind} if isinstance(kind, str) else kind), "optional": True}

    def cell_schema(kind: str | Mapping[str, Any]) -> dict[str, Any]:
        return {
            "type": "struct",
            "name": "cell_value",
            "optional": True,
            "fields": [
                field("value", optional(kind)),
                field("deletion_ts", {"type": "int64", "optional": True}),
                field("set", {"type": "boolean", "optional": False}),
            ],
        }

    key_schema = {
        "type": "struct",
        "name": f"{keyspace}.{table}.Key",
        "optional": False,
        "fields": [field(n, optional(columns[n])) for n in key],
    }
    source = {
        "type": "struct",
        "name": "source",
        "optional": False,
        "fields": [
            field("ts_us", {"type": "int64", "optional": True}),
            field("keyspace", {"type": "string", "optional": False}),
            field("table", {"type": "string", "optional": False}),
        ],
    }
    after = {
        "type": "struct",
        "name": "after",
        "optional": False,
        "fields": [field(n, cell_schema(t)) for n, t in columns.items()],
    }
    envelope = {
        "type": "struct",
        "name": f"{keyspace}.{table}.Envelope",
        "optional": False,
        "fields": [
            field("ts_ms", {"type": "int64", "optional": False}),
            field("op", {"type": "string", "optional": False}),
            field("source", source),
            field("after", after),
        ],
    }
    payload_after: dict[str, Any] = {n: None for n in columns}
    for name, value in {**key, **cells}.items():
        payload_after[name] = {"value": value, "deletion_ts": None, "set": True}
    payload = {
        "ts_ms": ts_us // 1000,
        "op": op,
        "source": {"ts_us": ts_us, "keyspace": keyspace, "table": table},
        "after": payload_after,
    }
    return (
        json.dumps({"schema": key_schema, "payload": dict(key)}).encode(),
        json.dumps({"schema": envelope, "payload": payload}).encode(),
    )
