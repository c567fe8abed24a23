"""Side by side: Debezium's JDBC sink connector and cdc-sink draining the same change stream.

    .venv/bin/python benchmarks/peers/compare.py [--events 200000] [--rounds 2]
        [--peer-configs upsert,reduction,reduction-no-tombstones] [--cassandra-envelope]

One generator run (`cdc_synth.synth`, seed --seed) is written three times to the local stack's
Kafka, JsonConverter with schemas each time: in the Debezium Cassandra connector's envelope for
cdc-sink, and in a relational connector's envelope (flat columns, full row images) for the JDBC
sink, once with a tombstone after each delete and once without (`relational.py`). Then, round
after round, each configuration of the JDBC sink (Kafka Connect standalone, one task, upsert,
key from the record key, batches of 1,000) drains its topics into a fresh PostgreSQL schema,
each followed by one cdc-sink worker draining its own; every run starts from the same topics.

A run ends when every offset is stored as applied (cdc-sink: `_cdc_checkpoints`; Connect: the
connector's committed consumer offsets, flushed every 500 ms). Per run: events/s from the
process start (JVM or Python) and from the moment it is ready (the task RUNNING, the worker's
/ready), CPU per event of the sink process (utime + stime from /proc/<pid>/stat), its peak RSS
(VmHWM) and whether the tables hold exactly the rows the generator's model expects.

--cassandra-envelope also points the JDBC sink at cdc-sink's topics (Cassandra envelope) and
reports what it does with them. Everything the run made (topics, consumer groups, schemas,
processes, work folders) is removed when it ends, also when it fails (--keep keeps the topics
and schemas). The table goes to stdout, the JSON to benchmarks/results/peers-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEERS = Path(__file__).resolve().parent
sys.path.insert(0, str(PEERS.parent))  # benchmarks/: run.py's producer, loader and summary

import asyncpg  # noqa: E402
import connect  # noqa: E402
import relational  # noqa: E402
from confluent_kafka import Consumer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

import run as bench  # noqa: E402
from cdc_sink.schema.tables import qualified, quote_ident  # noqa: E402
from cdc_synth import synth  # noqa: E402
from cdc_synth.demo import create_cassandra_tables, endpoints  # noqa: E402

CHUNK = 20_000  # events encoded and sent at a time: the encoded stream is a few GB
PEER_CONFIGS = {
    # name: (use.reduction.buffer, topics with tombstones)
    "upsert": (False, True),
    "reduction": (True, True),
    "reduction-no-tombstones": (True, False),
}
log = bench.log
Ends = dict[tuple[str, int], int]


@dataclass
class Stream:
    """The preloaded topics of one envelope and what they hold."""

    prefix: str
    ends: Ends
    records: int

    def topics(self) -> list[str]:
        return [self.prefix + table for table in synth.TABLES]


@dataclass
class Preloaded:
    events: int
    ours: Stream
    tombstones: Stream
    plain: Stream
    expected: dict[str, set[relational.Key]]
    expected_rows: dict[str, int]


def _ends(sent: Iterable[synth.Sent], into: Ends) -> int:
    n = 0
    for s in sent:
        into[s.topic, s.partition] = max(into.get((s.topic, s.partition), 0), s.offset + 1)
        n += 1
    return n


def new_streams(stamp: str) -> tuple[Stream, Stream, Stream]:
    """The empty streams of one comparison: cdc-sink's, the JDBC sink's with tombstones and
    without."""
    return (
        Stream(f"cdc-events-peers_{stamp}-", {}, 0),
        Stream(f"peers_{stamp}_tomb_", {}, 0),
        Stream(f"peers_{stamp}_plain_", {}, 0),
    )


async def preload(
    args: argparse.Namespace, streams: tuple[Stream, Stream, Stream], env: dict[str, str]
) -> Preloaded:
    """Generate the events once and write the three streams."""
    bootstrap = env["CDC_KAFKA__BOOTSTRAP_SERVERS"]
    ours, tombstones, plain = streams
    await asyncio.to_thread(create_cassandra_tables, env)  # cdc-sink reads the column types
    for stream in (ours, tombstones, plain):
        await synth.ensure_topics(bootstrap, stream.topics())
    generator = synth.Generator(args.seed, start_us=time.time_ns() // 1000)
    replica = relational.Replica(tombstones=True)
    encoder = relational.JsonRecords()
    log(f"generating and sending {args.events:,} events in three envelopes")
    began = time.monotonic()
    for start in range(0, args.events, CHUNK):
        events = generator.take(min(CHUNK, args.events - start))
        changes = list(replica.changes(events))
        encoded = [(change, *encoder.encode(change)) for change in changes]
        for stream, keep_tombstones in ((tombstones, True), (plain, False)):
            records = [
                (stream.prefix + change.table, key, value)
                for change, key, value in encoded
                if keep_tombstones or change.op is not None
            ]
            stream.records += _ends(await synth.produce_encoded(bootstrap, records), stream.ends)
        sent = await synth.produce(
            bootstrap, events, "json", topic_prefix=ours.prefix, client="librdkafka"
        )
        ours.records += _ends(sent, ours.ends)
        log(f"sent {start + len(events):,}/{args.events:,} events")
    log(f"preloaded in {time.monotonic() - began:.0f} s")
    expected = {
        table: relational.canonical_rows(synth.TABLES[table], rows.values())
        for table, rows in replica.rows.items()
    }
    return Preloaded(args.events, ours, tombstones, plain, expected, generator.live_rows())


# --- checking the tables ----------------------------------------------------------------------


async def compare_tables(
    pg: asyncpg.Connection, schema: str, tables: dict[str, str], expected: dict[str, set[Any]]
) -> dict[str, Any]:
    """Rows per table, and how many expected rows are missing or differ / are extra."""
    found: dict[str, Any] = {"rows": {}, "missing": 0, "extra": 0}
    for table, target in tables.items():
        spec = synth.TABLES[table]
        columns = ", ".join(quote_ident(c) for c, _ in spec.columns)
        try:
            rows = await pg.fetch(f"SELECT {columns} FROM {qualified(schema, target)}")
        except asyncpg.UndefinedTableError:
            rows = []
        have = relational.canonical_rows(spec, (dict(r) for r in rows))
        found["rows"][table] = len(rows)
        found["missing"] += len(expected[table] - have)
        found["extra"] += len(have - expected[table])
    found["exact"] = found["missing"] == 0 and found["extra"] == 0
    return found


# --- one run of either sink -------------------------------------------------------------------


class Sampler:
    """A sink process's CPU seconds and peak RSS, read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = time.monotonic()
        self.ready_at: float | None = None
        self.ready_cpu = 0.0

    def cpu(self) -> float:
        return bench.pid_cpu_s(self.pid)

    def mark_ready(self) -> None:
        if self.ready_at is None:
            self.ready_at, self.ready_cpu = time.monotonic(), self.cpu()

    def result(self, events: int) -> dict[str, Any]:
        """Figures at the end of the drain (call while the process still runs)."""
        done, cpu = time.monotonic(), self.cpu()
        ready_at = self.ready_at or self.started
        return {
            "wall_s": round(done - self.started, 2),
            "events_per_s": round(events / (done - self.started)),
            "startup_s": round(ready_at - self.started, 2),
            "events_per_s_from_ready": round(events / max(done - ready_at, 1e-9)),
            "cpu_s": round(cpu, 2),
            "cpu_us_per_event": round(cpu / events * 1e6, 1),
            "cpu_us_per_event_from_ready": round((cpu - self.ready_cpu) / events * 1e6, 1),
            "peak_rss_mib": round(connect.peak_rss_mib(self.pid), 1),
            "load_average_1m": round(os.getloadavg()[0], 2),
        }


async def drained(
    done: Callable[[], Awaitable[bool]],
    failed: Callable[[], Awaitable[str | None]],
    timeout_s: float,
) -> str | None:
    """Poll every 0.1 s until `done()`; None then, or why not: what `failed()` said first, or
    that time ran out."""
    deadline = time.monotonic() + timeout_s
    while not await done():
        error = await failed()
        if error:
            return error
        if time.monotonic() > deadline:
            return f"not done within {timeout_s:.0f} s"
        await asyncio.sleep(0.1)
    return None


def committed(consumer: Consumer, ends: Ends) -> Ends:
    partitions = [TopicPartition(topic, partition) for topic, partition in ends]
    return {
        (tp.topic, tp.partition): max(tp.offset, 0)
        for tp in consumer.committed(partitions, timeout=10)
    }


@dataclass
class Leftovers:
    """What the runs made in the shared stack, recorded as it is made so that a run cut short
    is cleaned up too."""

    schemas: list[str]
    groups: list[str]


async def start_peer(
    name: str,
    topics: list[str],
    *,
    reduction_buffer: bool,
    work: Path,
    lib: Path,
    env: dict[str, str],
    made: Leftovers,
) -> tuple[connect.ConnectProcess, Sampler, str]:
    """A fresh schema and a Kafka Connect JVM whose JDBC sink drains `topics` into it;
    (process, its sampler, schema). The process runs (and should be stopped) even when its
    task fails to start: the caller reads why."""
    schema = name.replace("-", "_")
    made.schemas.append(schema)
    made.groups.append(f"connect-{name}")
    pg = await asyncpg.connect(env["CDC_POSTGRES__DSN"])
    try:
        await pg.execute(f"CREATE SCHEMA {quote_ident(schema)}")
    finally:
        await pg.close()
    process = connect.ConnectProcess(
        work / name,
        env["CDC_KAFKA__BOOTSTRAP_SERVERS"],
        connect.connector_properties(
            name, topics, env["CDC_POSTGRES__DSN"], schema, reduction_buffer=reduction_buffer
        ),
        bench.free_port(),
        bench.RESULTS / f"{name}.connect.log",
    )
    return process, Sampler(process.start(lib)), schema


async def run_peer(
    label: str,
    stream: Stream,
    data: Preloaded,
    *,
    reduction_buffer: bool,
    work: Path,
    lib: Path,
    env: dict[str, str],
    made: Leftovers,
    timeout_s: float,
) -> dict[str, Any]:
    """The JDBC sink drains `stream` into its own schema; its figures and table check."""
    name = f"{work.name}-{label}"
    consumer = Consumer(
        {"bootstrap.servers": env["CDC_KAFKA__BOOTSTRAP_SERVERS"], "group.id": f"connect-{name}"}
    )
    log(f"{label}: starting Kafka Connect")
    process, sampler, schema = await start_peer(
        name,
        stream.topics(),
        reduction_buffer=reduction_buffer,
        work=work,
        lib=lib,
        env=env,
        made=made,
    )
    summary: dict[str, Any] = {"sink": "debezium-jdbc", "config": label, "schema": schema}
    try:
        await asyncio.to_thread(process.wait_running)
        sampler.mark_ready()

        async def done() -> bool:
            return await asyncio.to_thread(committed, consumer, stream.ends) == stream.ends

        async def failed() -> str | None:
            state, trace = await asyncio.to_thread(process.task_state)
            return None if state == "RUNNING" else f"task {state}: {connect.root_cause(trace)}"

        error = await drained(done, failed, timeout_s)
        summary |= {"error": error} if error else sampler.result(data.events)
    except connect.ConnectError as exc:
        summary["error"] = str(exc)
    finally:
        await asyncio.to_thread(process.stop)
        await asyncio.to_thread(consumer.close)
    summary["records"] = stream.records
    pg = await asyncpg.connect(env["CDC_POSTGRES__DSN"])
    try:
        tables = {t: stream.prefix + t for t in synth.TABLES}
        summary |= await compare_tables(pg, schema, tables, data.expected)
    finally:
        await pg.close()
    log(f"{label}: {_line(summary)}")
    return summary


async def run_ours(
    n: int, data: Preloaded, *, args: argparse.Namespace, made: Leftovers, timeout_s: float
) -> dict[str, Any]:
    """One cdc-sink worker (`python -m cdc_sink run`, as run.py starts it) drains the Cassandra
    envelope topics into its own schema; its figures and table check."""
    worker_args = argparse.Namespace(
        batch_size=None, worker_env=args.worker_env, format="json", keep=False
    )
    run = bench.Run("peers", worker_args)
    run.name = f"peers_ours_{run.stamp}_{n}"
    run.prefix, run.group = data.ours.prefix, f"cdc-sink-{run.name}"
    run.log_path = bench.RESULTS / f"peers-{run.stamp}-ours-{n}.worker.log"
    summary: dict[str, Any] = {"sink": "cdc-sink", "config": "json", "schema": run.name}
    made.schemas.append(run.name)
    made.groups.append(run.group)
    pg = await run.pg()
    log("cdc-sink: starting the worker")
    worker = await run.start_worker()
    try:
        sampler = Sampler(worker.pid)

        async def mark_when_ready() -> None:
            # A worker that never gets ready fails the drain below, which says why.
            with contextlib.suppress(RuntimeError, TimeoutError):
                await bench.wait_ready(run.port, worker)
                sampler.mark_ready()

        ready = asyncio.create_task(mark_when_ready())

        async def done() -> bool:
            return await run.applied(pg) == data.ours.ends

        async def failed() -> str | None:
            code = worker.returncode
            return None if code is None else f"the worker exited with {code}"

        error = await drained(done, failed, timeout_s)
        summary |= {"error": error} if error else sampler.result(data.events)
        ready.cancel()
    finally:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
        await worker.wait()
        run.finish_worker()
    summary["records"] = data.ours.records
    summary |= await compare_tables(
        pg, run.name, {t: f"cdc_{t}" for t in synth.TABLES}, data.expected
    )
    summary["dead_letters"] = (await run.table_stats(pg))["dead_letters"]
    await pg.close()
    log(f"cdc-sink: {_line(summary)}")
    return summary


async def run_peer_on_cassandra_envelope(
    data: Preloaded, *, work: Path, lib: Path, env: dict[str, str], made: Leftovers
) -> dict[str, Any]:
    """The JDBC sink pointed at the Debezium Cassandra connector's envelope (cdc-sink's
    topics): what its task reports and what lands in PostgreSQL within a minute."""
    process, _, schema = await start_peer(
        f"{work.name}-cassandra",
        data.ours.topics(),
        reduction_buffer=True,
        work=work,
        lib=lib,
        env=env,
        made=made,
    )
    outcome: dict[str, Any] = {"sink": "debezium-jdbc", "config": "cassandra-envelope"}
    try:
        await asyncio.to_thread(process.wait_running)
        deadline = time.monotonic() + 60
        state, trace = "RUNNING", ""
        while state == "RUNNING" and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            state, trace = await asyncio.to_thread(process.task_state)
        outcome["task_state"] = state
        outcome["error"] = connect.root_cause(trace)
    except connect.ConnectError as exc:
        outcome["task_state"] = "FAILED"
        outcome["error"] = str(exc)
    finally:
        await asyncio.to_thread(process.stop)
    pg = await asyncpg.connect(env["CDC_POSTGRES__DSN"])
    try:
        tables = await pg.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
        outcome["rows"] = {
            r["table_name"]: await pg.fetchval(
                f"SELECT count(*) FROM {qualified(schema, r['table_name'])}"
            )
            for r in tables
        }
    finally:
        await pg.close()
    log(f"cassandra envelope: {outcome}")
    return outcome


def _line(summary: dict[str, Any]) -> str:
    if "events_per_s" not in summary:
        return f"FAILED ({summary.get('error')}); rows {summary['rows']}"
    return (
        f"{summary['events_per_s']:,} events/s ({summary['events_per_s_from_ready']:,} from "
        f"ready), {summary['cpu_us_per_event']} µs CPU/event, peak RSS "
        f"{summary['peak_rss_mib']:,.0f} MiB, rows exact: {summary['exact']}"
    )


# --- the whole comparison ---------------------------------------------------------------------


async def drop_schemas(env: dict[str, str], schemas: Iterable[str]) -> None:
    pg = await asyncpg.connect(env["CDC_POSTGRES__DSN"])
    try:
        for schema in schemas:
            await pg.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")
    finally:
        await pg.close()


def delete_groups(bootstrap: str, groups: list[str]) -> None:
    if not groups:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_consumer_groups(groups, request_timeout=30).values():
        # A group that never committed does not exist.
        with contextlib.suppress(Exception):
            future.result()


async def compare(args: argparse.Namespace) -> dict[str, Any]:
    env = endpoints()
    bootstrap = env["CDC_KAFKA__BOOTSTRAP_SERVERS"]
    stamp = time.strftime("%Y%m%d_%H%M%S")
    lib = await asyncio.to_thread(connect.fetch_jars)
    scratch = Path(tempfile.mkdtemp(prefix="cdc-peers-"))
    work = scratch / f"peers-{stamp.replace('_', '-')}"  # names the connectors and schemas
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: list[dict[str, Any]] = []
    made = Leftovers([], [])
    fresh = new_streams(stamp)
    try:
        data = await preload(args, fresh, env)
        streams = {True: data.tombstones, False: data.plain}
        limit = max(900.0, args.events / 200)  # the slowest drain seen, on a loaded box: 500/s
        for round_no in range(1, args.rounds + 1):
            for label in args.peer_configs:
                reduction, with_tombstones = PEER_CONFIGS[label]
                log(f"round {round_no}: {label}, then cdc-sink")
                peer = await run_peer(
                    f"{label}-{round_no}",
                    streams[with_tombstones],
                    data,
                    reduction_buffer=reduction,
                    work=work,
                    lib=lib,
                    env=env,
                    made=made,
                    timeout_s=limit,
                )
                runs.append(peer | {"config": label, "round": round_no})
                ours = await run_ours(len(runs), data, args=args, made=made, timeout_s=limit)
                runs.append(ours | {"round": round_no})
        cassandra = None
        if args.cassandra_envelope:
            cassandra = await run_peer_on_cassandra_envelope(
                data, work=work, lib=lib, env=env, made=made
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.keep:
            await drop_schemas(env, made.schemas)
            await asyncio.to_thread(delete_groups, bootstrap, made.groups)
            prefixes = tuple(stream.prefix for stream in fresh)
            await synth.delete_topics(bootstrap, lambda t: t.startswith(prefixes))
            log("removed the run's topics, consumer groups and schemas")
    return {
        "mode": "peers",
        "events": args.events,
        "records": {
            "cdc-sink": data.ours.records,
            "debezium-jdbc (tombstones)": data.tombstones.records,
            "debezium-jdbc (no tombstones)": data.plain.records,
        },
        "expected_rows": data.expected_rows,
        "rounds": args.rounds,
        "runs": runs,
        "cassandra_envelope": cassandra,
        "load_average_before": load_before,
        "debezium_jdbc": connect.pom_property("debezium.version"),
        "kafka_connect": connect.pom_property("kafka.version"),
        "machine": bench.machine(),
    }


def paired(runs: list[dict[str, Any]]) -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Each JDBC sink run with the cdc-sink run right after it, by configuration: the two ran
    on the same topics under the most similar load the box had."""
    pairs: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for peer, ours in itertools.pairwise(runs):
        if peer["sink"] == "debezium-jdbc" and ours["sink"] == "cdc-sink":
            pairs.setdefault(peer["config"], []).append((peer, ours))
    return pairs


def table(summary: dict[str, Any]) -> str:
    """One line per JDBC sink configuration, each figure per round ("a / b"): the JDBC sink's
    run beside the cdc-sink run that followed it, and cdc-sink's throughput over the JDBC
    sink's; then the median of those ratios against the JDBC sink at its best."""

    def each(runs: list[dict[str, Any]], key: str) -> str:
        values = [r.get(key) for r in runs]
        return " / ".join("—" if v is None else f"{v:,.0f}" for v in values)

    def ratio(peer: dict[str, Any], ours: dict[str, Any], key: str) -> float | None:
        if key not in peer or key not in ours:
            return None
        return float(ours[key]) / float(peer[key])

    lines = [
        "| JDBC sink config | events/s JDBC | events/s cdc-sink | cdc-sink ÷ JDBC "
        "| CPU µs/event JDBC | CPU µs/event cdc-sink | peak RSS MiB JDBC | peak RSS MiB cdc-sink "
        "| rows exact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    medians: dict[str, tuple[float, float, float]] = {}
    for config, pairs in paired(summary["runs"]).items():
        peers, ours = [p for p, _ in pairs], [o for _, o in pairs]
        speed = [ratio(p, o, "events_per_s") for p, o in pairs]
        cpu = [ratio(p, o, "cpu_us_per_event") for p, o in pairs]
        exact = sum(1 for r in peers + ours if r.get("exact"))
        errors = {r["error"] for r in peers + ours if r.get("error")}
        lines.append(
            f"| {config} | {each(peers, 'events_per_s')} | {each(ours, 'events_per_s')} | "
            + " / ".join("—" if v is None else f"{v:.2f}" for v in speed)
            + f" | {each(peers, 'cpu_us_per_event')} | {each(ours, 'cpu_us_per_event')}"
            f" | {each(peers, 'peak_rss_mib')} | {each(ours, 'peak_rss_mib')}"
            f" | {exact}/{len(peers) + len(ours)}"
            + (f" ({'; '.join(sorted(errors))})" if errors else "")
            + " |"
        )
        ok = [p["events_per_s"] for p in peers if "events_per_s" in p]
        speeds, cpus = [v for v in speed if v], [v for v in cpu if v]
        if ok and speeds and cpus:
            medians[config] = (
                statistics.median(ok),
                statistics.median(speeds),
                statistics.median(cpus),
            )
    if medians:
        best = max(medians, key=lambda config: medians[config][0])
        _, speed_ratio, cpu_ratio = medians[best]
        lines += [
            "",
            f"Against the JDBC sink at its best ({best}), median over rounds: cdc-sink moves "
            f"x{speed_ratio:.2f} its events/s at x{cpu_ratio:.2f} its CPU per event.",
        ]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/peers/compare.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--peer-configs",
        type=lambda text: [c for c in text.split(",") if c],
        default=list(PEER_CONFIGS),
        help=f"comma-separated, from {', '.join(PEER_CONFIGS)}",
    )
    parser.add_argument(
        "--cassandra-envelope",
        action="store_true",
        help="also run the JDBC sink on the Cassandra connector's envelope and report the outcome",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the cdc-sink worker (repeatable)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the topics and schemas")
    args = parser.parse_args(argv)
    unknown = set(args.peer_configs) - set(PEER_CONFIGS)
    if unknown:
        parser.error(f"unknown --peer-configs {sorted(unknown)}")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the clean-up of the runs, as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    bench.RESULTS.mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = asyncio.run(compare(args))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    summary["table"] = table(summary)
    path = bench.RESULTS / f"peers-{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(summary["table"])
    log(f"written {path.relative_to(PEERS.parents[1])}")
    ok = all(r.get("exact") and "error" not in r for r in summary["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
