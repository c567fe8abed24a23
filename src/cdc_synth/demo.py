"""`make demo`: a realistic change stream through the sink on the local stack, shown live.

Produces 30,000 synthetic Debezium Cassandra events (Avro through the schema registry) at a few
thousand per second, runs a sink worker in this process, prints progress once a second and a
summary, and exits 0 once every event is applied (1 if the sink fails or stalls). With `--json`
the summary is also printed as one JSON object on the last line, for programs. Each run uses its
own topics, consumer group and PostgreSQL schema (named after the start time); leftovers of
earlier demo runs are removed first. Endpoints come from the CDC_* environment or from
`deploy/local/stack env --json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from cdc_sink.app import SinkApp
from cdc_sink.config import (
    CassandraConfig,
    Config,
    HttpConfig,
    KafkaConfig,
    LogConfig,
    PostgresConfig,
    SchemaRegistryConfig,
    Secret,
)
from cdc_sink.ops.logs import configure_logging
from cdc_sink.schema.tables import qualified, quote_ident
from cdc_synth import synth

EVENTS = 30_000
RATE = 4_000.0  # events/s offered by the producer
STALL_S = 60.0  # no progress for this long: give up
RUN_PREFIX = "demo_"
STACK = Path(__file__).resolve().parents[2] / "deploy" / "local" / "stack"


def endpoints() -> dict[str, str]:
    """The stack's CDC_* endpoints: from the environment if set, else from the stack script."""
    if os.environ.get("CDC_KAFKA__BOOTSTRAP_SERVERS"):
        return dict(os.environ)
    out = subprocess.run([str(STACK), "env", "--json"], check=True, capture_output=True, text=True)
    found: dict[str, str] = json.loads(out.stdout)
    return found


def create_cassandra_tables(env: dict[str, str]) -> None:
    """The `shop` tables in Cassandra, so the sink reads exact column types from system_schema."""
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy

    hosts = env["CDC_CASSANDRA__CONTACT_POINTS"].split(",")
    policy = DCAwareRoundRobinPolicy(env.get("CDC_CASSANDRA__LOCAL_DC", "datacenter1"))
    profiles = {EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=policy)}
    port = int(env["CDC_CASSANDRA__PORT"])
    user = env.get("CDC_CASSANDRA__USERNAME")
    auth = PlainTextAuthProvider(user, env["CDC_CASSANDRA__PASSWORD"]) if user else None
    cluster = Cluster(
        hosts, port=port, execution_profiles=profiles, protocol_version=5, auth_provider=auth
    )
    try:
        session = cluster.connect()
        for statement in synth.cql_ddl():
            session.execute(statement)
    finally:
        cluster.shutdown()


async def remove_earlier_runs(env: dict[str, str], pg: asyncpg.Connection) -> None:
    for (schema,) in await pg.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", RUN_PREFIX + "%"
    ):
        await pg.execute(f"DROP SCHEMA {quote_ident(schema)} CASCADE")
    admin = AIOKafkaAdminClient(bootstrap_servers=env["CDC_KAFKA__BOOTSTRAP_SERVERS"])
    await admin.start()
    try:
        old = [t for t in await admin.list_topics() if t.startswith(f"cdc-events-{RUN_PREFIX}")]
        if old:
            await admin.delete_topics(old)
    finally:
        await admin.close()


async def count(pg: asyncpg.Connection, sql: str, *args: object) -> int:
    """A count that is 0 while the table does not exist yet."""
    try:
        return int(await pg.fetchval(sql, *args) or 0)
    except asyncpg.UndefinedTableError:
        return 0


async def main(*, json_summary: bool = False) -> int:
    """One demo run; 0 when every table holds what Cassandra would return, else 1."""
    env = endpoints()
    run = time.strftime(f"{RUN_PREFIX}%Y%m%d_%H%M%S")
    prefix = f"cdc-events-{run}-"
    dsn = env["CDC_POSTGRES__DSN"]
    config = Config(
        kafka=KafkaConfig(
            bootstrap_servers=env["CDC_KAFKA__BOOTSTRAP_SERVERS"],
            group_id=f"cdc-sink-{run}",
            topic_pattern=f"^{re.escape(prefix)}",
        ),
        schema_registry=SchemaRegistryConfig(url=env["CDC_SCHEMA_REGISTRY__URL"]),
        postgres=PostgresConfig(dsn=Secret(dsn), schema=run),
        http=HttpConfig(host="127.0.0.1", port=0),
        cassandra=CassandraConfig(
            contact_points=env["CDC_CASSANDRA__CONTACT_POINTS"],
            port=int(env["CDC_CASSANDRA__PORT"]),
            local_dc=env.get("CDC_CASSANDRA__LOCAL_DC", "datacenter1"),
            username=env.get("CDC_CASSANDRA__USERNAME"),
            password=Secret(env.get("CDC_CASSANDRA__PASSWORD", "")) or None,
        ),
        log=LogConfig(level="warning", json=False),
    )
    configure_logging("warning", json=False)  # the worker's per-batch info lines would drown us
    print(f"demo run {run}: {EVENTS:,} events at {RATE:,.0f}/s into schema {run}")
    pg = await asyncpg.connect(dsn)
    await remove_earlier_runs(env, pg)
    await asyncio.to_thread(create_cassandra_tables, env)
    topics = [synth.topic_for(t, prefix) for t in synth.TABLES]
    await synth.ensure_topics(config.kafka.bootstrap_servers, topics)

    worker = SinkApp(config)
    sink = asyncio.create_task(worker.run())
    generator = synth.Generator(seed=42, start_us=time.time_ns() // 1000)
    events = generator.take(EVENTS)
    sent = [0]
    producer = asyncio.create_task(
        synth.produce(
            config.kafka.bootstrap_servers,
            events,
            "avro",
            config.schema_registry.url,
            rate=RATE,
            topic_prefix=prefix,
            on_sent=lambda n: sent.__setitem__(0, n),
        )
    )
    probe = AIOKafkaConsumer(bootstrap_servers=config.kafka.bootstrap_servers)
    await probe.start()
    partitions = [TopicPartition(t, p) for t in topics for p in range(synth.PARTITIONS)]
    tables = {
        t: qualified(run, config.sink.table_name_format.format(table=t)) for t in synth.TABLES
    }
    checkpoints = f"SELECT sum(next_offset) FROM {qualified(run, '_cdc_checkpoints')}"
    began = last_progress = time.monotonic()
    last_applied = status = 0
    try:
        while True:
            await asyncio.sleep(1.0)
            now, applied = time.monotonic(), worker.applied_events
            ends = sum((await probe.end_offsets(partitions)).values())
            lag = ends - await count(pg, checkpoints)
            rows = {t: await count(pg, f"SELECT count(*) FROM {q}") for t, q in tables.items()}
            shown = "  ".join(f"{t} {n:>6,}" for t, n in rows.items())
            print(
                f"{now - began:6.1f}s  produced {sent[0]:>6,}  applied {applied:>6,} "
                f"({applied - last_applied:>6,}/s)  lag {lag:>6,}  rows: {shown}",
                flush=True,
            )
            if applied != last_applied:
                last_progress, last_applied = now, applied
            failure = (
                "the sink worker stopped unexpectedly"
                if sink.done()
                else f"producing failed: {producer.exception()!r}"
                if producer.done() and producer.exception()
                else f"no progress for {STALL_S:.0f} s: giving up"
                if now - last_progress > STALL_S
                else None
            )
            if failure:
                print(failure, file=sys.stderr)
                status = 1
                break
            if producer.done() and lag == 0 and ends >= EVENTS:
                break
        elapsed = time.monotonic() - began
    finally:
        worker.stop()
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        await sink  # re-raises the worker's failure, if it had one
        await probe.stop()
    rows = {t: await count(pg, f"SELECT count(*) FROM {q}") for t, q in tables.items()}
    dead = await count(pg, f"SELECT count(*) FROM {qualified(run, '_cdc_dlq_records')}")
    await pg.close()
    print(f"\nsummary of {run}")
    print(f"  events produced   {sent[0]:>10,}")
    print(f"  events applied    {worker.applied_events:>10,}")
    print(f"  elapsed           {elapsed:>10.1f} s")
    print(f"  mean rate         {worker.applied_events / elapsed:>10,.0f} events/s")
    expected = generator.live_rows()
    for table, n in rows.items():
        verdict = "as in Cassandra" if n == expected[table] else f"MISMATCH: {expected[table]:,}"
        print(f"  rows {table:<12} {n:>10,}   {tables[table]} ({verdict})")
    print(f"  dead letters      {dead:>10,}")
    if json_summary:
        summary = {
            "run": run,
            "events_produced": sent[0],
            "events_applied": worker.applied_events,
            "elapsed_s": round(elapsed, 3),
            "rows": rows,
            "expected_rows": expected,
            "dead_letters": dead,
        }
        print(json.dumps(summary))
    if rows != expected:
        print("the sink's tables differ from what Cassandra would return", file=sys.stderr)
        status = 1
    return status


def run() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cdc_synth.demo",
        description="Stream synthetic change events through a sink worker on the local stack.",
    )
    parser.add_argument("--json", action="store_true", help="end with the summary as JSON")
    sys.exit(asyncio.run(main(json_summary=parser.parse_args().json)))


if __name__ == "__main__":
    run()
