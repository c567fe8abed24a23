"""CPU cost per event of the worker's pure path, in process: no Kafka, no PostgreSQL.

    .venv/bin/python benchmarks/pipeline.py [--events 100000] [--batch-size 1000] [--repeat 3]
                                            [--format avro|json|json-schemaless] [--profile FILE]

The events come from `cdc_synth.synth` (the same mix as benchmarks/run.py) and are encoded as the
connector writes them. As in the worker, one batch of `--batch-size` records at a time goes
through every stage; each stage is timed with `time.process_time()` (CPU of this process only;
other load on the machine still inflates it, so compare runs made side by side):

- decode: `Decoder.decode(key, value)` per record (schemas served from memory, after a warm-up);
- interpret+resolve+convert: per record as `consumer.prepare` does it: `direct_mutation` (the
  one-pass path, the catalog warm as in steady state), else `events.interpret`,
  `Catalog.resolve` and `TableSchema.to_mutation`;
- write: `PgWriter.apply` per batch of `--batch-size` records against a stand-in connection
  that answers every query with nothing (so every key is new): advisory-lock and lookup
  arguments, the merge (`plan.apply_mutations`, `settle_plan`), staging records, tombstones.
  asyncpg's own encoding and PostgreSQL are not in this figure.

The figures are the medians of `--repeat` runs, in µs per event. `benchmarks/run.py` measures the
whole worker (`worker_cpu_us_per_event`) against the real stack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from cdc_sink import cli
from cdc_sink.apply.codecs import use_asyncpg_uuids
from cdc_sink.apply.writer import Batch, CheckpointMove, PgWriter
from cdc_sink.decode.decoder import Decoder
from cdc_sink.model import scalars
from cdc_sink.model.events import Mutation, Position, interpret
from cdc_sink.schema.catalog import Catalog
from cdc_sink.schema.direct import direct_mutation
from cdc_sink.schema.tables import TableSchema
from cdc_synth import synth

TABLE_FORMAT = "cdc_{table}"
FORMATS = ("avro", "json", "json-schemaless")


class MemoryRegistry:
    """Schema texts by id, from memory."""

    def __init__(self, texts: dict[int, str]) -> None:
        self.texts = texts

    async def schema_by_id(self, schema_id: int) -> str:
        return self.texts[schema_id]


class NullConnection:
    """Stands in for an asyncpg connection: every query succeeds and finds nothing, except that
    every checkpoint compare-and-set succeeds (it returns each partition it moved)."""

    async def execute(self, sql: str, *args: Any) -> str:
        return "UPDATE 1"

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        if sql.startswith("UPDATE _cdc_checkpoints"):
            moved = zip(args[1], args[2], strict=True)  # the topics and partitions moved
            return [{"topic": t, "kafka_partition": p} for t, p in moved]
        return []

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return None

    async def executemany(self, sql: str, args: Any) -> None:
        return None

    async def copy_records_to_table(self, table: str, *, records: Any, columns: Any) -> None:
        for _ in records:
            pass

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield


def table_schemas() -> dict[str, TableSchema]:
    """The target schema of every synth table, as the catalog builds it from Cassandra."""
    schemas = (synth.target_schema(name, TABLE_FORMAT) for name in synth.TABLES)
    return {schema.target: schema for schema in schemas}


def records(
    events: list[synth.SynthEvent], fmt: str
) -> tuple[list[tuple[bytes, bytes]], dict[int, str]]:
    """(key bytes, value bytes) per event, and the registry's schema texts."""
    if fmt != "avro":
        encoder: Any = synth.JsonEncoder() if fmt == "json" else synth.SchemalessJsonEncoder()
        return [encoder.encode(e) for e in events], {}
    ids: dict[str, tuple[int, int]] = {}
    texts: dict[int, str] = {}
    for n, table in enumerate(synth.TABLES):
        ids[table] = (2 * n + 1, 2 * n + 2)
        for schema_id, schema in zip(ids[table], synth.avro_schemas(table), strict=True):
            texts[schema_id] = json.dumps(schema)
    encoder = synth.AvroEncoder(ids)
    return [encoder.encode(e) for e in events], texts


async def one_run(
    raw: list[tuple[bytes, bytes]], texts: dict[int, str], batch_size: int
) -> dict[str, float]:
    for cache in ("_UUIDS", "_INETS"):  # start each run as a fresh worker would
        getattr(scalars, cache, {}).clear()
    decoder = Decoder(MemoryRegistry(texts))
    for key, value in raw[:100]:  # fetch and parse every schema before timing
        await decoder.decode(key, value)
    catalog = Catalog(None, "bench", TABLE_FORMAT)  # type: ignore[arg-type]
    catalog._tables.update(table_schemas())  # a warm catalog: no PostgreSQL
    writer = PgWriter(NullConnection(), "bench", "bench")  # type: ignore[arg-type]
    seconds = dict.fromkeys(("decode", "interpret+resolve+convert", "write"), 0.0)
    moves = [CheckpointMove("cdc-events-bench", p, 0, 1, 1) for p in range(8)]
    for start in range(0, len(raw), batch_size):
        chunk = raw[start : start + batch_size]
        # As the worker does: one batch at a time through every stage.
        began = time.process_time()
        decoded = [await decoder.decode(k, v) for k, v in chunk]
        seconds["decode"] += time.process_time() - began

        began = time.process_time()
        per_table: dict[str, tuple[TableSchema, list[Mutation]]] = {}
        for n, d in enumerate(decoded):
            position = Position("cdc-events-bench", n % 8, start + n)
            # As consumer.prepare does: the one-pass path, else the three stages.
            converted = direct_mutation(catalog.known, d.key, d.value, position)
            if converted is None:
                event = interpret(d.key, d.value, position)
                schema = await catalog.resolve(event, d.key_schema, d.column_schemas)
                mutation = schema.to_mutation(event)
            else:
                mutation, schema, _ = converted
            per_table.setdefault(schema.target, (schema, []))[1].append(mutation)
        seconds["interpret+resolve+convert"] += time.process_time() - began

        began = time.process_time()
        await writer.apply(Batch(tables=list(per_table.values()), checkpoints=moves))
        seconds["write"] += time.process_time() - began
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--format", choices=FORMATS, default="avro")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", help="write a cProfile of one run to this file")
    parser.add_argument(
        "--default-gc",
        action="store_true",
        help="keep Python's default garbage collector settings (the worker tunes them)",
    )
    args = parser.parse_args(argv)
    use_asyncpg_uuids()  # as the worker's composition root does

    events = synth.generate(args.events, args.seed, start_us=time.time_ns() // 1000)
    raw, texts = records(events, args.format)
    del events
    if not args.default_gc:
        cli.tune_gc()  # as `python -m cdc_sink run` does once it has started
    runs = []
    for _ in range(args.repeat):
        runs.append(asyncio.run(one_run(raw, texts, args.batch_size)))
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(asyncio.run, one_run(raw, texts, args.batch_size))
        profiler.dump_stats(args.profile)
    best = {stage: statistics.median(r[stage] for r in runs) for stage in runs[0]}
    us = {stage: round(s / args.events * 1e6, 2) for stage, s in best.items()}
    summary = {
        "events": args.events,
        "format": args.format,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "gc": "default" if args.default_gc else "tuned",
        "us_per_event": {**us, "total": round(sum(us.values()), 2)},
        "runs_total_us_per_event": [round(sum(r.values()) / args.events * 1e6, 2) for r in runs],
    }
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
