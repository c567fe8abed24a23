"""Resident memory of one cdc-sink worker draining a large backlog.

    .venv/bin/python benchmarks/memory.py [--events 1000000] [--format avro|json] [--seed 1]

Preloads the events (cdc_synth.synth, produced like `run.py drain` does), then runs
`python -m cdc_sink run --stop-when-caught-up` as a subprocess and samples its VmRSS and VmHWM
(peak resident set) from /proc/<pid>/status every 0.2 s until it exits. The target is a peak
below 300 MB whatever the backlog: the consumer must not buffer more than a bounded amount
when PostgreSQL is slower than Kafka. The JSON summary goes to stdout and to
benchmarks/results/memory-<timestamp>.json, with a plot of RSS and progress over time beside it
when matplotlib is installed. The run's topics and schema are removed at the end (`--keep`
keeps them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from cdc_synth import synth
from run import RESULTS, Run, _pyplot, end_offsets, log, machine, pid_cpu_s

TARGET_MB = 300
CHUNK = 100_000  # events generated and produced at a time, to keep this process small


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a live process in KiB; (0, 0) once it is gone."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount = line.split(":", 1)
                values[name] = int(amount.split()[0])
    except OSError:
        return 0, 0
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


async def preload(run: Run, total: int, seed: int) -> tuple[dict[tuple[str, int], int], float]:
    """Produce `total` events; return the end offset per partition and the seconds taken."""
    generator = synth.Generator(seed, start_us=time.time_ns() // 1000)
    ends: dict[tuple[str, int], int] = {}
    began = time.monotonic()
    done = 0
    while done < total:
        events = generator.take(min(CHUNK, total - done))
        sent = await run.produce(events, rate=None)
        for key, end in end_offsets(sent).items():
            ends[key] = max(ends.get(key, 0), end)
        done += len(sent)
        log(f"preloaded {done:,}/{total:,}")
    return ends, time.monotonic() - began


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    run = Run("memory", args)
    try:
        return await _measure(run, args)
    finally:
        await run.remove()


async def _measure(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    await run.prepare()
    ends, preload_s = await preload(run, args.events, args.seed)
    total = sum(ends.values())
    log(f"backlog of {total:,} events in {preload_s:.0f} s; starting the worker")
    pg = await run.pg()
    started = time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker = await run.start_worker("--stop-when-caught-up")
    samples: list[tuple[float, int, int]] = []  # (seconds since start, RSS KiB, events applied)
    progress: list[tuple[int, float]] = []  # (events applied, worker CPU seconds so far)
    peak_kib = 0
    last_progress = 0.0
    while worker.returncode is None:
        rss, hwm = memory_kib(worker.pid)
        peak_kib = max(peak_kib, hwm)
        elapsed = time.monotonic() - started
        if elapsed - last_progress >= 2 or not samples:
            applied = sum((await run.applied(pg)).values())
            last_progress = elapsed
            with contextlib.suppress(OSError, IndexError, ValueError):  # it may have exited
                progress.append((applied, pid_cpu_s(worker.pid)))
            log(f"{applied:,} applied, RSS {rss / 1024:.0f} MiB (peak {peak_kib / 1024:.0f})")
        if rss:
            samples.append((elapsed, rss, applied))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.wait(), timeout=0.2)
    wall_s = time.monotonic() - started
    run.finish_worker()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (
        cpu_after.ru_stime - cpu_before.ru_stime
    )
    applied_offsets = await run.applied(pg)
    await pg.close()
    rss_mib = sorted(s[1] / 1024 for s in samples)
    summary = {
        "mode": "memory",
        "run": run.name,
        "format": args.format,
        "events": total,
        "worker_exit_code": worker.returncode,
        "all_offsets_applied": applied_offsets == ends,
        "wall_s": round(wall_s, 1),
        "events_per_s": round(total / wall_s),
        "worker_cpu_us_per_event": round(worker_cpu_s / total * 1e6, 1),
        "worker_cpu_us_per_event_by_fifth": cpu_by_fifth(progress, total),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "target_mib": TARGET_MB,
        "under_target": peak_kib / 1024 < TARGET_MB,
        "rss_mib_median": round(rss_mib[len(rss_mib) // 2], 1) if rss_mib else None,
        "rss_samples": len(samples),
        "preload_s": round(preload_s, 1),
        "batch_size": args.batch_size or 1000,
        "machine": machine(),
    }
    plot(run, samples, summary)
    return run.write(summary)


def cpu_by_fifth(progress: list[tuple[int, float]], total: int) -> list[float | None]:
    """The worker's CPU µs per event over each fifth of the backlog, from (applied, CPU s)
    samples: whether an event costs more once the tables hold more."""
    fifths: list[float | None] = []
    for n in range(5):
        low, high = total * n // 5, total * (n + 1) // 5
        inside = [p for p in progress if low <= p[0] <= high]
        if len(inside) < 2 or inside[-1][0] == inside[0][0]:
            fifths.append(None)
            continue
        events, cpu = inside[-1][0] - inside[0][0], inside[-1][1] - inside[0][1]
        fifths.append(round(cpu / events * 1e6, 1))
    return fifths


def plot(run: Run, samples: list[tuple[float, int, int]], summary: dict[str, Any]) -> None:
    plt = _pyplot()
    if plt is None or not samples:
        return
    figure, rss_axes = plt.subplots(figsize=(9, 4.5))
    seconds = [s[0] for s in samples]
    rss_axes.plot(seconds, [s[1] / 1024 for s in samples], label="RSS (MiB)")
    rss_axes.axhline(TARGET_MB, linestyle="--", color="red", label=f"target {TARGET_MB} MB")
    rss_axes.set_xlabel("seconds since the worker started")
    rss_axes.set_ylabel("resident memory (MiB)")
    progress = rss_axes.twinx()
    progress.plot(seconds, [s[2] for s in samples], color="gray", label="events applied")
    progress.set_ylabel("events applied")
    rss_axes.legend(loc="upper left")
    figure.suptitle(
        f"memory: {summary['events']:,}-event backlog, one worker — peak "
        f"{summary['peak_rss_mib']:,.0f} MiB, {summary['events_per_s']:,} events/s"
    )
    figure.tight_layout()
    figure.savefig(RESULTS / f"memory-{run.stamp}.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/memory.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--format", choices=("avro", "json"), default="avro")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--keep", action="store_true", help="keep the run's topics and PostgreSQL schema"
    )
    parser.add_argument("--batch-size", type=int, help="CDC_SINK__BATCH_SIZE (default 1000)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    summary = asyncio.run(measure(args))
    print(json.dumps(summary, indent=2))
    log(f"written {summary['result_file']}")
    return 0 if summary["all_offsets_applied"] and summary["worker_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
