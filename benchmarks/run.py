"""Throughput and latency of one cdc-sink worker against the local stack.

    .venv/bin/python benchmarks/run.py drain  [--events 200000] [--format F] [--profile F]
                                              [--py-spy F]
    .venv/bin/python benchmarks/run.py steady [--rate 5000] [--seconds 60] [--format F]

--format: avro (default), json (JsonConverter with schemas) or json-schemaless (without).

drain: preloads the events, then runs `python -m cdc_sink run --stop-when-caught-up` as a
subprocess and measures events applied per second (events / wall time from start to exit, and
over the commit window alone), checking that every offset was applied.

steady: runs the worker, produces at a fixed rate, and measures end-to-end latency from each
record's Kafka timestamp (its send time) to its commit, two ways: per live row (the row's
`_cdc_updated_at`, set at write time, minus the send time of the last event that touched it) and
per record (the worker's `batch_committed` log line, written after COMMIT, minus the record's
Kafka timestamp).

Each run gets its own topics, consumer group and PostgreSQL schema, and removes the topics and
the schema when it ends (`--keep` keeps them, to look at afterwards). The JSON summary goes to
stdout and to benchmarks/results/<mode>-<timestamp>.json, with a PNG plot beside it when
matplotlib is installed (`pip install -e '.[bench]'`). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx2 as httpx

from cdc_sink.schema.tables import qualified, quote_ident
from cdc_synth import synth
from cdc_synth.demo import create_cassandra_tables, endpoints

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
FORMATS = ("avro", "json", "json-schemaless")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, by linear interpolation."""
    if not values:
        return float("nan")
    at = (len(values) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (at - low)


def _stat_cpu_s(stat: Path) -> tuple[str, float]:
    """(command name, user + system CPU seconds so far) of one process from its /proc stat."""
    head, tail = stat.read_text().rsplit(")", 1)
    values = tail.split()
    ticks = int(values[11]) + int(values[12])  # utime, stime (clock ticks)
    return head.partition("(")[2], ticks / os.sysconf("SC_CLK_TCK")


def postgres_cpu_s() -> float:
    """CPU seconds used so far by every live PostgreSQL process (server and backends)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, seconds = _stat_cpu_s(stat)
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        if name == "postgres":
            total += seconds
    return total


def pid_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by one live process."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))[1]


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    memory_kb = 0
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal"):
                memory_kb = int(line.split()[1])
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git": commit + ("+uncommitted" if dirty else ""),
        # Other load on the box (1, 5, 15 min) at the end: the figures assume it was idle.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


class Run:
    """The names and settings one benchmark run uses."""

    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        self.mode = mode
        self.args = args
        self.stamp = time.strftime("%Y%m%d_%H%M%S")
        self.name = f"bench_{mode}_{self.stamp}"
        self.prefix = f"cdc-events-{self.name}-"
        self.group = f"cdc-sink-{self.name}"
        self.env = endpoints()
        self.port = free_port()
        self.log_path = RESULTS / f"{mode}-{self.stamp}.worker.log"
        self.log_paths: list[Path] = []  # one per worker started (the first is log_path)
        self.log_files: list[Any] = []

    def worker_env(self, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        env |= {k: v for k, v in self.env.items() if k.startswith("CDC_")}
        env |= {
            "CDC_KAFKA__GROUP_ID": self.group,
            "CDC_KAFKA__TOPIC_PATTERN": f"^{re.escape(self.prefix)}",
            "CDC_POSTGRES__SCHEMA": self.name,
            "CDC_HTTP__HOST": "127.0.0.1",
            "CDC_HTTP__PORT": str(port),
            "CDC_API__PORT": "0",
            "CDC_LOG__LEVEL": "info",  # as in production; batch_committed lines time the commits
            "CDC_LOG__JSON": "true",
        }
        if self.args.batch_size:
            env["CDC_SINK__BATCH_SIZE"] = str(self.args.batch_size)
        for setting in getattr(self.args, "worker_env", []):  # e.g. for an A/B of a setting
            name, _, value = setting.partition("=")
            env[name] = value
        return env

    async def start_worker(
        self, *extra: str, profile: str | None = None, py_spy: str | None = None
    ) -> asyncio.subprocess.Process:
        python = [sys.executable]
        if profile:
            python += ["-m", "cProfile", "-o", profile]
        if py_spy:
            spy = str(Path(sys.executable).with_name("py-spy"))
            python = [spy, "record", "-f", "raw", "-r", "200", "-o", py_spy, "--", *python]
        command = [*python, "-m", "cdc_sink", "run", *extra]
        # More workers (drain --workers) join the same group, each with its log and port.
        index = len(self.log_paths)
        path = self.log_path if index == 0 else self.log_path.with_suffix(f".{index + 1}.log")
        log_file = await asyncio.to_thread(path.open, "wb")  # see finish_worker
        self.log_paths.append(path)
        self.log_files.append(log_file)
        port = self.port if index == 0 else free_port()
        return await asyncio.create_subprocess_exec(
            *command, env=self.worker_env(port), stdout=log_file, stderr=log_file
        )

    def finish_worker(self) -> None:
        for log_file in self.log_files:
            log_file.close()

    async def prepare(self) -> None:
        log(f"run {self.name}: Cassandra tables, topics")
        await asyncio.to_thread(create_cassandra_tables, self.env)
        topics = [synth.topic_for(t, self.prefix) for t in synth.TABLES]
        await synth.ensure_topics(self.env["CDC_KAFKA__BOOTSTRAP_SERVERS"], topics)

    async def produce(self, events: list[synth.SynthEvent], rate: float | None) -> list[synth.Sent]:
        last = [0.0]

        def progress(n: int) -> None:
            if time.monotonic() - last[0] >= 5:
                last[0] = time.monotonic()
                log(f"produced {n:,}/{len(events):,}")

        return await synth.produce(
            self.env["CDC_KAFKA__BOOTSTRAP_SERVERS"],
            events,
            self.args.format,
            self.env["CDC_SCHEMA_REGISTRY__URL"],
            rate=rate,
            topic_prefix=self.prefix,
            on_sent=progress,
            client="librdkafka",  # its sends take the harness little CPU
        )

    async def pg(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.env["CDC_POSTGRES__DSN"])

    async def remove(self) -> None:
        """Delete the run's topics and PostgreSQL schema (unless --keep): runs of a million
        events would otherwise pile up gigabytes in the local stack."""
        if self.args.keep:
            log(f"kept topics {self.prefix}* and schema {self.name}")
            return
        try:
            topics = {synth.topic_for(t, self.prefix) for t in synth.TABLES}
            await synth.delete_topics(self.env["CDC_KAFKA__BOOTSTRAP_SERVERS"], topics.__contains__)
            pg = await self.pg()
            try:
                await pg.execute(f"DROP SCHEMA IF EXISTS {quote_ident(self.name)} CASCADE")
            finally:
                await pg.close()
        except Exception as exc:  # noqa: BLE001 - never hide why the run itself failed
            log(f"could not remove topics {self.prefix}* / schema {self.name}: {exc!r}")
            return
        log(f"removed topics {self.prefix}* and schema {self.name}")

    async def applied(self, pg: asyncpg.Connection) -> dict[tuple[str, int], int]:
        """next_offset per (topic, partition) stored by the worker; {} before it made the table."""
        try:
            rows = await pg.fetch(
                f"SELECT topic, kafka_partition, next_offset FROM "
                f"{qualified(self.name, '_cdc_checkpoints')} WHERE consumer_group = $1",
                self.group,
            )
        except asyncpg.UndefinedTableError:
            return {}
        return {(r["topic"], r["kafka_partition"]): r["next_offset"] for r in rows}

    async def table_stats(self, pg: asyncpg.Connection) -> dict[str, Any]:
        rows = {}
        for table in synth.TABLES:
            rows[table] = await pg.fetchval(
                f"SELECT count(*) FROM {qualified(self.name, 'cdc_' + table)}"
            )
        dead = await pg.fetchval(f"SELECT count(*) FROM {qualified(self.name, '_cdc_dlq_records')}")
        return {"rows": rows, "dead_letters": dead}

    def write(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Store the summary as results/<mode>-<timestamp>.json; return it with its path."""
        path = RESULTS / f"{self.mode}-{self.stamp}.json"
        summary["result_file"] = str(path.relative_to(ROOT.parent))
        path.write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def end_offsets(sent: list[synth.Sent]) -> dict[tuple[str, int], int]:
    ends: dict[tuple[str, int], int] = {}
    for s in sent:
        ends[s.topic, s.partition] = max(ends.get((s.topic, s.partition), 0), s.offset + 1)
    return ends


def commits(log_path: Path) -> list[tuple[float, str, int, int, int]]:
    """(unix time, topic, partition, first offset, next offset) of every committed batch."""
    found = []
    with open(log_path, "rb") as lines:
        for raw in lines:
            if b"batch_committed" not in raw:
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            stamp = datetime.fromisoformat(line["timestamp"]).timestamp()
            found.extend(
                (stamp, p["topic"], p["partition"], p["first_offset"], p["next_offset"])
                for p in line["partitions"]
            )
    return found


async def scrape(port: int) -> dict[str, float]:
    """The worker's counters that matter here, from GET /metrics (empty if it is not up)."""
    totals: dict[str, float] = defaultdict(float)
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            body = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return {}
    for line in body.splitlines():
        for name in ("cdc_events_processed_total", "cdc_errors_total", "cdc_retries_total"):
            if line.startswith(name + "{") or line.startswith(name + " "):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return dict(totals)


# --- drain -------------------------------------------------------------------------------------


async def drain(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    await run.prepare()
    generator = synth.Generator(args.seed, start_us=time.time_ns() // 1000)
    log(f"generating {args.events:,} events")
    events = generator.take(args.events)
    began = time.monotonic()
    sent = await run.produce(events, rate=None)
    produce_s = time.monotonic() - began
    log(f"preloaded {len(sent):,} events in {produce_s:.1f} s ({len(sent) / produce_s:,.0f}/s)")
    ends = end_offsets(sent)

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    postgres_before = postgres_cpu_s()
    started = time.time()
    workers = [
        await run.start_worker("--stop-when-caught-up", profile=args.profile, py_spy=args.py_spy)
        for _ in range(args.workers)
    ]
    metrics: dict[str, float] = {}
    postgres_s = 0.0  # sampled every 2 s, so the last seconds are missing: a lower bound
    while any(w.returncode is None for w in workers):
        try:
            await asyncio.wait_for(asyncio.gather(*(w.wait() for w in workers)), timeout=2)
        except TimeoutError:
            metrics = await scrape(run.port) or metrics
            postgres_s = postgres_cpu_s() - postgres_before  # its backends vanish at exit
            log(f"worker: {metrics.get('cdc_events_processed_total', 0):,.0f} events applied")
    worker = workers[0]
    wall_s = time.time() - started
    run.finish_worker()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (
        cpu_after.ru_stime - cpu_before.ru_stime
    )

    pg = await run.pg()
    applied = await run.applied(pg)
    stats = await run.table_stats(pg)
    await pg.close()
    batches = sorted(b for path in run.log_paths for b in commits(path))
    first, last = (batches[0][0], batches[-1][0]) if batches else (started, started)
    window_s = max(last - first, 1e-9)
    summary = {
        "mode": "drain",
        "run": run.name,
        "format": args.format,
        "events": len(sent),
        "worker_exit_code": worker.returncode,
        "workers": args.workers,
        "worker_exit_codes": [w.returncode for w in workers],
        "wall_s": round(wall_s, 2),
        "events_per_s": round(len(sent) / wall_s),
        "startup_s": round(first - started, 2),
        "commit_window_s": round(window_s, 2),
        "events_per_s_commit_window": round(len(sent) / window_s),
        "partition_commits": len(batches),
        "worker_cpu_s": round(worker_cpu_s, 1),
        "worker_cpu_us_per_event": round(worker_cpu_s / len(sent) * 1e6, 1),
        "postgres_cpu_s_at_least": round(postgres_s, 1),
        "all_offsets_applied": applied == ends,
        "offsets_missing": sum(max(0, e - applied.get(tp, 0)) for tp, e in ends.items()),
        "last_metrics": metrics,
        "rows": stats["rows"],
        "expected_rows": generator.live_rows(),
        "dead_letters": stats["dead_letters"],
        "preload_s": round(produce_s, 1),
        "profile": args.profile,
        "py_spy": args.py_spy,
        "batch_size": args.batch_size or 1000,
        "machine": machine(),
    }
    plot_drain(run, batches, started, summary)
    return run.write(summary)


def plot_drain(
    run: Run,
    batches: list[tuple[float, str, int, int, int]],
    started: float,
    summary: dict[str, Any],
) -> None:
    plt = _pyplot()
    if plt is None or not batches:
        return
    per_second: dict[int, int] = defaultdict(int)
    for stamp, _, _, first, following in batches:
        per_second[int(stamp - started)] += following - first
    seconds = range(max(per_second) + 1)
    figure, axes = plt.subplots(figsize=(9, 4.5))
    axes.plot(list(seconds), [per_second.get(s, 0) for s in seconds], drawstyle="steps-post")
    axes.axhline(summary["events_per_s"], linestyle="--", color="gray", label="mean (wall)")
    axes.set_xlabel("seconds since the worker started")
    axes.set_ylabel("events applied per second")
    axes.set_title(
        f"drain: {summary['events']:,} {summary['format']} events, "
        f"{summary['workers']} worker(s) — "
        f"{summary['events_per_s']:,} events/s"
    )
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(RESULTS / f"drain-{run.stamp}.png", dpi=110)


# --- steady ------------------------------------------------------------------------------------


async def steady(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    await run.prepare()
    total = int(args.rate * args.seconds)
    generator = synth.Generator(
        args.seed, start_us=time.time_ns() // 1000 + 5_000_000, step_us=int(1e6 / args.rate)
    )
    events = generator.take(total)
    worker = await run.start_worker()
    try:
        await wait_ready(run.port, worker)
        log(f"worker ready; producing {total:,} events at {args.rate:,.0f}/s")
        cpu_at_start = cpu_sample(worker.pid)
        began = time.monotonic()
        sent = await run.produce(events, rate=args.rate)
        produce_s = time.monotonic() - began
        cpu = {k: round(v - cpu_at_start[k], 1) for k, v in cpu_sample(worker.pid).items()}
        ends = end_offsets(sent)
        pg = await run.pg()
        deadline = time.monotonic() + 300
        while True:  # until the worker has stored every offset as applied
            applied = await run.applied(pg)
            if applied == ends or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        metrics = await scrape(run.port)
    finally:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
        await worker.wait()
        run.finish_worker()
    row_samples = await row_latencies(run, pg, events, sent)
    stats = await run.table_stats(pg)
    await pg.close()
    timeline, batches = record_latencies(run, sent)
    # The first seconds include the worker's cold start (tables created, Cassandra's schema
    # read): kept in the plot, left out of the percentiles.
    measured_from = sent[0].sent_at + args.warmup
    record_latency = sorted(lat for sent_at, lat in timeline if sent_at >= measured_from)
    row_latency = sorted(lat for touched, lat in row_samples if touched >= measured_from)
    last = batches[-1][0] if batches else 0.0
    summary = {
        "mode": "steady",
        "run": run.name,
        "format": args.format,
        "offered_rate": args.rate,
        "seconds": args.seconds,
        "events": len(sent),
        "achieved_produce_rate": round(len(sent) / (sent[-1].sent_at - sent[0].sent_at)),
        "achieved_apply_rate": round(len(sent) / max(last - sent[0].sent_at, 1e-9)),
        "produce_s": round(produce_s, 1),
        # CPU seconds while producing (the harness includes encoding the events up front)
        "cpu_s_while_producing": cpu,
        "all_offsets_applied": applied == ends,
        "warmup_s_excluded": args.warmup,
        "latency_ms_per_row": _summary(row_latency),
        "latency_ms_per_record": _summary(record_latency),
        "partition_commits": len(batches),
        "last_metrics": metrics,
        "rows": stats["rows"],
        "expected_rows": generator.live_rows(),
        "dead_letters": stats["dead_letters"],
        "worker_exit_code": worker.returncode,
        "batch_size": args.batch_size or 1000,
        "machine": machine(),
    }
    plot_steady(run, row_latency, record_latency, timeline, summary)
    return run.write(summary)


def cpu_sample(worker_pid: int) -> dict[str, float]:
    """CPU seconds so far: the worker, PostgreSQL, this harness, and the whole machine (busy
    and available), to see who competes for the cores during a steady run."""
    busy, available = machine_busy()
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "worker": pid_cpu_s(worker_pid),
        "postgres": postgres_cpu_s(),
        "harness": own.ru_utime + own.ru_stime,
        "machine_busy": busy,
        "machine_available": available,
    }


async def wait_ready(port: int, worker: asyncio.subprocess.Process) -> None:
    """Until GET /ready answers 200 (partitions assigned, PostgreSQL reachable)."""
    deadline = time.monotonic() + 120
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if worker.returncode is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("the worker was not ready within 120 s")


async def row_latencies(
    run: Run, pg: asyncpg.Connection, events: list[synth.SynthEvent], sent: list[synth.Sent]
) -> list[tuple[float, float]]:
    """(send time, latency ms) per live row: its `_cdc_updated_at` minus the send time of the
    last event that touched it. A partition or range delete touches (rewrites) every row of
    its partition."""
    last_sent: dict[tuple[str, tuple[Any, ...]], float] = {}
    partition_sent: dict[tuple[str, tuple[Any, ...]], float] = {}
    for event, s in zip(events, sent, strict=True):
        spec = synth.TABLES[event.table]
        if event.op == "r" or event.is_partition_delete:
            partition = tuple(str(event.key[c]) for c in spec.partition_key)
            partition_sent[event.table, partition] = s.sent_at
        else:
            last_sent[event.table, tuple(str(event.key[c]) for c in spec.key)] = s.sent_at
    latencies = []
    for table, spec in synth.TABLES.items():
        columns = ", ".join(f"{c}::text" for c in spec.key)
        target = qualified(run.name, f"cdc_{table}")
        for row in await pg.fetch(f"SELECT {columns}, _cdc_updated_at FROM {target}"):
            key = tuple(row[i] for i in range(len(spec.key)))
            touched = max(
                last_sent.get((table, key), 0.0),
                partition_sent.get((table, key[: len(spec.partition_key)]), 0.0),
            )
            if touched:
                latency = (row["_cdc_updated_at"].timestamp() - touched) * 1000
                latencies.append((touched, latency))
    return latencies


def record_latencies(
    run: Run, sent: list[synth.Sent]
) -> tuple[list[tuple[float, float]], list[tuple[float, str, int, int, int]]]:
    """(send time, latency ms) per record: the time of the batch_committed line covering its
    offset minus its Kafka timestamp; and the commits themselves."""
    batches = commits(run.log_path)
    per_partition: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for stamp, topic, partition, _, following in batches:
        per_partition[topic, partition].append((following, stamp))
    for entries in per_partition.values():
        entries.sort()
    latencies = []
    for s in sent:
        entries = per_partition.get((s.topic, s.partition), [])
        at = bisect.bisect_right(entries, (s.offset, float("inf")))
        if at < len(entries):  # the first batch whose next offset is beyond this record
            latencies.append((s.sent_at, entries[at][1] * 1000 - s.timestamp_ms))
    return latencies, batches


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), 1),
        "p95": round(percentile(values, 95), 1),
        "p99": round(percentile(values, 99), 1),
        "max": round(values[-1], 1),
        "mean": round(sum(values) / len(values), 1),
    }


def plot_steady(
    run: Run,
    rows: list[float],
    records: list[float],
    timeline: list[tuple[float, float]],
    summary: dict[str, Any],
) -> None:
    plt = _pyplot()
    if plt is None or not records:
        return
    figure, (histogram, cdf, over_time) = plt.subplots(1, 3, figsize=(15, 4.5))
    for values, label in ((records, "per record (Kafka ts → commit)"), (rows, "per row (→ write)")):
        if values:
            histogram.hist(values, bins=80, alpha=0.6, label=label)
            cdf.plot(values, [i / len(values) for i in range(1, len(values) + 1)], label=label)
    histogram.set_xlabel("end-to-end latency (ms)")
    histogram.set_ylabel("events")
    histogram.legend()
    for q in (50, 95, 99):
        cdf.axhline(q / 100, color="gray", linewidth=0.5)
    cdf.set_xlabel("end-to-end latency (ms)")
    cdf.set_ylabel("fraction ≤ latency")
    cdf.legend(loc="lower right")
    start = min(sent_at for sent_at, _ in timeline)
    per_second: dict[int, list[float]] = defaultdict(list)
    for sent_at, latency in timeline:
        per_second[int(sent_at - start)].append(latency)
    seconds = sorted(per_second)
    for q in (50, 95, 99):
        points = [percentile(sorted(per_second[s]), q) for s in seconds]
        over_time.plot(seconds, points, label=f"P{q}")
    over_time.set_xlabel("send time (s since the first event)")
    over_time.set_ylabel("latency per record (ms)")
    over_time.legend()
    per_record = summary["latency_ms_per_record"]
    figure.suptitle(
        f"steady: {summary['offered_rate']:,.0f} events/s offered for {summary['seconds']:.0f} s"
        f" — per record P50 {per_record['p50']:,.0f} ms, P95 {per_record['p95']:,.0f} ms, "
        f"P99 {per_record['p99']:,.0f} ms; applied {summary['achieved_apply_rate']:,}/s"
    )
    for axes in (histogram, cdf, over_time):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(RESULTS / f"steady-{run.stamp}.png", dpi=110)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    return plt


# --- main --------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    for name, help_text in (
        ("drain", "preload events, then time one worker applying them all"),
        ("steady", "produce at a fixed rate and measure end-to-end latency"),
    ):
        mode = modes.add_parser(name, help=help_text)
        mode.add_argument("--format", choices=FORMATS, default="avro")
        mode.add_argument("--seed", type=int, default=1)
        mode.add_argument(
            "--keep", action="store_true", help="keep the run's topics and PostgreSQL schema"
        )
        mode.add_argument("--batch-size", type=int, help="CDC_SINK__BATCH_SIZE (default 1000)")
        mode.add_argument(
            "--worker-env",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="a setting for the worker (repeatable), e.g. CDC_KAFKA__FETCH_MIN_BYTES=1",
        )
        if name == "drain":
            mode.add_argument("--events", type=int, default=200_000)
            mode.add_argument(
                "--workers",
                type=int,
                default=1,
                help="worker processes in the group (the targets are for one); "
                "worker_cpu_us_per_event is then theirs together",
            )
            mode.add_argument("--profile", help="run the worker under cProfile, writing here")
            mode.add_argument(
                "--py-spy",
                help="sample the worker with py-spy (pip install py-spy), raw stacks to this "
                "file; its CPU counts in worker_cpu_us_per_event",
            )
        else:
            mode.add_argument("--rate", type=float, default=5_000.0, help="events/s")
            mode.add_argument("--seconds", type=float, default=60.0)
            mode.add_argument(
                "--warmup", type=float, default=5.0, help="seconds left out of the percentiles"
            )
    return parser.parse_args(argv)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One run of the chosen mode; its topics and schema are removed however it ends."""
    run = Run(args.mode, args)
    try:
        return await (drain if args.mode == "drain" else steady)(run, args)
    finally:
        await run.remove()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    RESULTS.mkdir(exist_ok=True)
    summary = asyncio.run(measure(args))
    print(json.dumps(summary, indent=2))
    log(f"written {summary['result_file']}")
    codes = summary.get("worker_exit_codes", [summary["worker_exit_code"]])
    ok = summary["all_offsets_applied"] and all(code == 0 for code in codes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
