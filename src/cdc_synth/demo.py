"""`make demo`: change data through a sink worker on the local stack, shown live (the README's
"Demo and benchmarks" describes both parts).

`--mode captured` runs the real pipeline (CQL writes into the stack's Cassandra, captured by its
Debezium agent, then a checksum job per table), `--mode synthetic` 30,000 generated Avro events;
`both`, the default, runs the real one first. Exit 0 when every part lands exactly, 1 if the sink
fails, stalls or differs. `--json` ends with the summary as one JSON line: the synthetic part's
figures at the top level, the real part's under "captured". Each run has its own keyspace,
topics, consumer groups and PostgreSQL schemas, named after its start time; earlier runs' are
removed first. Endpoints come from the CDC_* environment or `deploy/local/stack env --json`.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

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
from cdc_synth import captured, synth

EVENTS = 30_000
RATE = 4_000.0  # events/s offered by the producer
STALL_S = 60.0  # no progress for this long: give up
CAPTURED_RATE = 300.0  # CQL statements/s written in the real part, so its progress can be seen
FLUSH_EVERY_S = 2.0
SETTLE_S = 3.0  # the real part: no new event for this long before the checksum jobs
AGENT_PREFIX = "CDC_STACK_DEBEZIUM_TOPIC_PREFIX"  # the stack's Debezium agent's topic prefix
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
    session = captured.cassandra_session(env)
    try:
        for statement in synth.cql_ddl():
            session.execute(statement)
    finally:
        session.cluster.shutdown()


def drop_earlier_keyspaces(env: dict[str, str]) -> None:
    session = captured.cassandra_session(env)
    try:
        for row in session.execute("SELECT keyspace_name FROM system_schema.keyspaces"):
            if row.keyspace_name.startswith(RUN_PREFIX):
                session.execute(f"DROP KEYSPACE IF EXISTS {row.keyspace_name}")
    finally:
        session.cluster.shutdown()


async def remove_earlier_runs(env: dict[str, str], pg: asyncpg.Connection) -> None:
    for (schema,) in await pg.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", RUN_PREFIX + "%"
    ):
        await pg.execute(f"DROP SCHEMA {quote_ident(schema)} CASCADE")
    ours = (f"cdc-events-{RUN_PREFIX}", f"{env.get(AGENT_PREFIX, '-')}.{RUN_PREFIX}")
    await synth.delete_topics(env["CDC_KAFKA__BOOTSTRAP_SERVERS"], lambda t: t.startswith(ours))
    await asyncio.to_thread(drop_earlier_keyspaces, env)


async def count(pg: asyncpg.Connection, sql: str, *args: object) -> int:
    """A count that is 0 while the table does not exist yet."""
    try:
        return int(await pg.fetchval(sql, *args) or 0)
    except asyncpg.UndefinedTableError:
        return 0


def sink_config(env: dict[str, str], group: str, topic_pattern: str, schema: str) -> Config:
    """A worker's settings on the stack: its own group, topics and schema; quiet logs."""
    return Config(
        kafka=KafkaConfig(
            bootstrap_servers=env["CDC_KAFKA__BOOTSTRAP_SERVERS"],
            group_id=group,
            topic_pattern=topic_pattern,
        ),
        schema_registry=SchemaRegistryConfig(url=env["CDC_SCHEMA_REGISTRY__URL"]),
        postgres=PostgresConfig(dsn=Secret(env["CDC_POSTGRES__DSN"]), schema=schema),
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


class Progress:
    """What the progress lines and the summary show of one worker's run: end offsets of its
    topics, its stored checkpoints, and the rows of its tables."""

    def __init__(self, pg: asyncpg.Connection, config: Config, topics: list[str]) -> None:
        schema = config.postgres.schema
        self.pg = pg
        self.partitions = [TopicPartition(t, p) for t in topics for p in range(synth.PARTITIONS)]
        self.tables = {
            t: qualified(schema, config.sink.table_name_format.format(table=t))
            for t in synth.TABLES
        }
        self.checkpoints = f"SELECT sum(next_offset) FROM {qualified(schema, '_cdc_checkpoints')}"
        self.dead = f"SELECT count(*) FROM {qualified(schema, '_cdc_dlq_records')}"
        self.probe = AIOKafkaConsumer(bootstrap_servers=config.kafka.bootstrap_servers)

    async def rows(self) -> dict[str, int]:
        tables = self.tables.items()
        return {t: await count(self.pg, f"SELECT count(*) FROM {q}") for t, q in tables}

    async def report(self, elapsed_s: float, head: str) -> tuple[int, int]:
        """Print one progress line (`head`, the events in the topics, the lag, the rows);
        return the events and the lag (how many of them the worker has yet to apply)."""
        events = sum((await self.probe.end_offsets(self.partitions)).values())
        lag = events - await count(self.pg, self.checkpoints)
        rows = "  ".join(f"{t} {n:>6,}" for t, n in (await self.rows()).items())
        print(
            f"{elapsed_s:6.1f}s  {head}  in Kafka {events:>6,}  lag {lag:>6,}  rows: {rows}",
            flush=True,
        )
        return events, lag

    async def dead_letters(self) -> int:
        return await count(self.pg, self.dead)


def failure(sink: asyncio.Task[int], feeder: asyncio.Future[Any], idle_s: float) -> str | None:
    """Why the run must stop now, if it must."""
    if sink.done():
        return "the sink worker stopped unexpectedly"
    if feeder.done() and not feeder.cancelled() and feeder.exception():
        return f"feeding the pipeline failed: {feeder.exception()!r}"
    if idle_s > STALL_S:
        return f"no progress for {STALL_S:.0f} s: giving up"
    return None


async def stop_worker(
    worker: SinkApp, sink: asyncio.Task[int], feeder: asyncio.Future[Any]
) -> None:
    worker.stop()
    feeder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await feeder
    await sink  # re-raises the worker's failure, if it had one


def write_paced(session: Any, statements: list[captured.Statement], written: list[int]) -> None:
    """Execute the statements in order at CAPTURED_RATE, counting them in written[0]."""
    began = time.monotonic()
    for n, (cql, params) in enumerate(statements, 1):
        session.execute(cql, params)
        written[0] = n
        ahead = n / CAPTURED_RATE - (time.monotonic() - began)
        if ahead > 0:
            time.sleep(ahead)


async def flush_forever(stack_script: Path) -> None:
    """Flush Cassandra every FLUSH_EVERY_S, so the agent reads what was written."""
    while True:
        await asyncio.to_thread(captured.flush, stack_script)
        await asyncio.sleep(FLUSH_EVERY_S)


async def captured_run(env: dict[str, str], run: str, pg: asyncpg.Connection) -> dict[str, Any]:
    """The real pipeline: CQL writes → Cassandra → the Debezium agent → Kafka → the sink →
    PostgreSQL, then a checksum job per table. Its summary; "ok" says whether every job found
    no difference."""
    agent_prefix, home = env.get(AGENT_PREFIX), env.get("CDC_STACK_HOME")
    if not agent_prefix or not home:
        raise captured.CaptureError("this stack runs no Debezium agent (deploy/local/stack does)")
    keyspace, schema = run, f"{run}_captured"
    topics = [f"{agent_prefix}.{keyspace}.{table}" for table in synth.TABLES]
    config = sink_config(
        env, f"cdc-sink-{schema}", f"^{re.escape(f'{agent_prefix}.{keyspace}.')}", schema
    )
    statements = captured.workload(keyspace)
    print(
        f"demo run {run}, real pipeline: {len(statements):,} CQL writes into Cassandra keyspace "
        f"{keyspace}, captured by the Debezium agent, applied into schema {schema}"
    )
    # Made before the agent writes to them: 8 partitions each, and the worker sees them at once.
    await synth.ensure_topics(config.kafka.bootstrap_servers, topics)
    session = await asyncio.to_thread(captured.cassandra_session, env)
    agent_log = Path(home) / "run" / "debezium" / "service.log"
    progress = Progress(pg, config, topics)
    worker = SinkApp(config)
    checks: list[captured.Checksum] = []
    written = [0]
    try:
        await captured.create_tables_heard(session, keyspace, agent_log)
        await progress.probe.start()
        sink = asyncio.create_task(worker.run())
        writer = asyncio.create_task(asyncio.to_thread(write_paced, session, statements, written))
        flusher = asyncio.create_task(flush_forever(STACK))
        feeder = asyncio.gather(writer, flusher)
        job_env = {
            **os.environ,
            **env,
            "CDC_POSTGRES__SCHEMA": schema,
            "CDC_PUSHGATEWAY__URL": "",
        }
        began = last_change = time.monotonic()
        seen = -1
        try:
            while True:
                await asyncio.sleep(1.0)
                now = time.monotonic()
                events, lag = await progress.report(
                    now - began,
                    f"written {written[0]:>6,}  applied {worker.applied_events:>6,}",
                )
                if events != seen:
                    seen, last_change = events, now
                reason = failure(sink, feeder, now - last_change)
                if reason:
                    raise captured.CaptureError(reason)
                # The agent may send a mutation twice; "all there" is: every write is in,
                # nothing new came for a while, and the worker has applied it all.
                settled = now - last_change >= SETTLE_S
                if writer.done() and events >= len(statements) and lag == 0 and settled:
                    checks = await asyncio.to_thread(checksums, job_env, config)
                    shown = ", ".join(f"{c.table} {c.mismatches}" for c in checks)
                    print(f"checksum jobs, mismatches by table: {shown}", flush=True)
                    if all(c.mismatches == 0 for c in checks):
                        break
                    last_change = now  # not all captured yet: wait, flush, check again
            elapsed = time.monotonic() - began
        finally:
            await stop_worker(worker, sink, feeder)
            await progress.probe.stop()
    finally:
        await asyncio.to_thread(session.cluster.shutdown)
    summary: dict[str, Any] = {
        "keyspace": keyspace,
        "schema": schema,
        "statements_written": written[0],
        "events_captured": seen,
        "events_applied": worker.applied_events,
        "elapsed_s": round(elapsed, 3),
        "rows": await progress.rows(),
        "dead_letters": await progress.dead_letters(),
        "checksum": {c.table: {k: v for k, v in asdict(c).items() if k != "table"} for c in checks},
    }
    print(f"\nsummary of the real pipeline ({keyspace} → {schema})")
    print(f"  CQL statements    {written[0]:>10,}")
    print(f"  events captured   {seen:>10,}")
    print(f"  events applied    {worker.applied_events:>10,}")
    print(f"  elapsed           {elapsed:>10.1f} s")
    for c in checks:
        print(
            f"  checksum job {c.job:<4} {c.table:<14} cassandra {c.cassandra_rows:>6,}  "
            f"postgres {c.postgres_rows:>6,}  mismatches {c.mismatches}"
        )
    print(f"  dead letters      {summary['dead_letters']:>10,}\n")
    return summary


def checksums(env: dict[str, str], config: Config) -> list[captured.Checksum]:
    return [
        captured.checksum(env, config.sink.table_name_format.format(table=table))
        for table in synth.TABLES
    ]


async def synthetic_run(env: dict[str, str], run: str, pg: asyncpg.Connection) -> dict[str, Any]:
    """30,000 generated Avro events at RATE through a worker; its summary."""
    prefix = f"cdc-events-{run}-"
    topics = [synth.topic_for(t, prefix) for t in synth.TABLES]
    config = sink_config(env, f"cdc-sink-{run}", f"^{re.escape(prefix)}", run)
    print(f"demo run {run}, synthetic: {EVENTS:,} events at {RATE:,.0f}/s into schema {run}")
    await asyncio.to_thread(create_cassandra_tables, env)
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
    progress = Progress(pg, config, topics)
    await progress.probe.start()
    began = last_progress = time.monotonic()
    last_applied = 0
    try:
        while True:
            await asyncio.sleep(1.0)
            now, applied = time.monotonic(), worker.applied_events
            ends, lag = await progress.report(
                now - began,
                f"produced {sent[0]:>6,}  applied {applied:>6,} ({applied - last_applied:>6,}/s)",
            )
            if applied != last_applied:
                last_progress, last_applied = now, applied
            reason = failure(sink, producer, now - last_progress)
            if reason:
                raise captured.CaptureError(reason)
            if producer.done() and lag == 0 and ends >= EVENTS:
                break
        elapsed = time.monotonic() - began
    finally:
        await stop_worker(worker, sink, producer)
        await progress.probe.stop()
    rows = await progress.rows()
    dead = await progress.dead_letters()
    print(f"\nsummary of {run}")
    print(f"  events produced   {sent[0]:>10,}")
    print(f"  events applied    {worker.applied_events:>10,}")
    print(f"  elapsed           {elapsed:>10.1f} s")
    print(f"  mean rate         {worker.applied_events / elapsed:>10,.0f} events/s")
    expected = generator.live_rows()
    for table, n in rows.items():
        verdict = "as in Cassandra" if n == expected[table] else f"MISMATCH: {expected[table]:,}"
        print(f"  rows {table:<12} {n:>10,}   {progress.tables[table]} ({verdict})")
    print(f"  dead letters      {dead:>10,}")
    return {
        "run": run,
        "events_produced": sent[0],
        "events_applied": worker.applied_events,
        "elapsed_s": round(elapsed, 3),
        "rows": rows,
        "expected_rows": expected,
        "dead_letters": dead,
    }


async def main(*, mode: str = "both", json_summary: bool = False) -> int:
    """One demo run; 0 when every part ran lands exactly (see the module's doc), else 1."""
    env = endpoints()
    run = time.strftime(f"{RUN_PREFIX}%Y%m%d_%H%M%S")
    configure_logging("warning", json=False)  # the worker's per-batch info lines would drown us
    pg = await asyncpg.connect(env["CDC_POSTGRES__DSN"])
    summary: dict[str, Any] = {}
    status = 0
    try:
        await remove_earlier_runs(env, pg)
        if mode in ("both", "captured"):
            summary["captured"] = await captured_run(env, run, pg)
        if mode in ("both", "synthetic"):
            summary |= await synthetic_run(env, run, pg)
            if summary["rows"] != summary["expected_rows"]:
                print("the sink's tables differ from what Cassandra would return", file=sys.stderr)
                status = 1
    except captured.CaptureError as exc:
        print(exc, file=sys.stderr)
        status = 1
    finally:
        await pg.close()
    if json_summary:
        print(json.dumps(summary))
    return status


def run() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cdc_synth.demo",
        description="Change data through a sink worker on the local stack: CQL writes captured "
        "by the Debezium agent, and a synthetic stream.",
    )
    parser.add_argument(
        "--mode",
        choices=("both", "captured", "synthetic"),
        default="both",
        help="captured: the real pipeline from Cassandra; synthetic: 30,000 generated events "
        "(default: both, the real one first)",
    )
    parser.add_argument("--json", action="store_true", help="end with the summary as JSON")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(mode=args.mode, json_summary=args.json)))


if __name__ == "__main__":
    run()
