"""Throughput of good records while a share of the records carry random schema ids.

    .venv/bin/python benchmarks/unknown_ids.py [--events 10000] [--share 0.01] [--seed 1]

Preloads `--events` good Avro events (cdc_synth.synth, as `run.py drain` does) and, spread among
them in ten slices, `share * events` records whose Confluent header names a schema id no
registry issued; then runs `python -m cdc_sink run --stop-when-caught-up` and reports the good
events applied per second, over the whole run and over its commit window, and checks that every
random-id record was dead-lettered and every offset applied. The worker inherits PYTHONPATH, so
`PYTHONPATH=<another checkout>/src` measures that checkout's worker. The JSON summary goes to
stdout and to benchmarks/results/unknown_ids-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from cdc_synth import synth
from run import Run, commits, end_offsets, log, machine

SLICES = 10


async def produce_random_ids(
    bootstrap: str, topics: list[str], ids: list[int], rng: random.Random
) -> list[synth.Sent]:
    """One record per id, to a random topic and partition, with a body no schema would read."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent = []
        for schema_id in ids:
            value = b"\x00" + struct.pack(">I", schema_id) + b"\x02\x06abc"
            meta = await (await producer.send(rng.choice(topics), value))
            sent.append(synth.Sent(meta.topic, meta.partition, meta.offset, meta.timestamp, 0.0))
        return sent
    finally:
        await producer.stop()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    run = Run("unknown_ids", args)
    try:
        await run.prepare()
        generator = synth.Generator(args.seed, start_us=time.time_ns() // 1000)
        rng = random.Random(args.seed)  # noqa: S311 - benchmark data, not security
        count = round(args.events * args.share)
        ids = rng.sample(range(1_500_000_000, 2_000_000_000), count)
        topics = [synth.topic_for(t, run.prefix) for t in synth.TABLES]
        bootstrap = run.env["CDC_KAFKA__BOOTSTRAP_SERVERS"]
        sent: list[synth.Sent] = []
        for part in range(SLICES):
            sent += await run.produce(generator.take(args.events // SLICES), rate=None)
            sent += await produce_random_ids(bootstrap, topics, ids[part::SLICES], rng)
        log(f"preloaded {args.events:,} good events and {count:,} with random schema ids")
        ends = end_offsets(sent)
        started = time.time()
        worker = await run.start_worker("--stop-when-caught-up")
        await worker.wait()
        wall_s = time.time() - started
        run.finish_worker()
        pg = await run.pg()
        applied = await run.applied(pg)
        stats = await run.table_stats(pg)
        await pg.close()
        batches = sorted(commits(run.log_path))
        window_s = max(batches[-1][0] - batches[0][0], 1e-9) if batches else wall_s
        flood_at = flood_detected(run.log_path)
        after_flood = [b for b in batches if flood_at is not None and b[0] > flood_at]
        good = args.events // SLICES * SLICES
        summary = {
            "mode": "unknown_ids",
            "run": run.name,
            "good_events": good,
            "random_id_records": count,
            "worker_exit_code": worker.returncode,
            "wall_s": round(wall_s, 2),
            "good_events_per_s": round(good / wall_s),
            "commit_window_s": round(window_s, 2),
            "good_events_per_s_commit_window": round(good / window_s),
            # Records (good and random-id) committed from the worker's schema_ids_unknown_flood
            # line on, when unknown ids stop being waited for (only a worker that logs it counts).
            "records_per_s_after_flood_detected": (
                round(sum(b[4] - b[3] for b in after_flood) / (after_flood[-1][0] - flood_at))
                if after_flood and flood_at is not None
                else None
            ),
            "dead_letters": stats["dead_letters"],
            "all_random_ids_dead_lettered": stats["dead_letters"] == count,
            "all_offsets_applied": applied == ends,
            "rows_as_expected": stats["rows"] == generator.live_rows(),
            "machine": machine(),
        }
        return run.write(summary)
    finally:
        await run.remove()


def flood_detected(log_path: Path) -> float | None:
    """When the worker logged schema_ids_unknown_flood (unix time), if it did."""
    with open(log_path, "rb") as lines:
        for raw in lines:
            if b"schema_ids_unknown_flood" in raw:
                stamp: str = json.loads(raw)["timestamp"]
                return datetime.fromisoformat(stamp).timestamp()
    return None


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/unknown_ids.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=10_000, help="good events")
    parser.add_argument("--share", type=float, default=0.01, help="random-id records per event")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the topics and the schema")
    parser.add_argument("--batch-size", type=int, help="CDC_SINK__BATCH_SIZE (default 1000)")
    args = parser.parse_args(argv)
    args.format = "avro"
    args.worker_env = []
    return args


def main(argv: list[str] | None = None) -> int:
    summary = asyncio.run(measure(parse(argv)))
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0 if summary["all_offsets_applied"] and summary["all_random_ids_dead_lettered"] else 1


if __name__ == "__main__":
    sys.exit(main())
