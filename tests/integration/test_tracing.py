"""Traces: `python -m cdc_sink` exports a span per batch (and per reconciliation job) over
OTLP/HTTP to a collector, and its log lines carry the trace ids; a collector that is away or
a batch not sampled never holds the pipeline back."""

from __future__ import annotations

from tests.support.cassandra_model import Mutation
from tests.support.names import Unique
from tests.support.otlp import Collector, Span, otlp_collector
from tests.support.pipeline import (
    create_cassandra_model_table,
    create_topic,
    fetch_value,
    json_lines,
    produce,
    run_cli,
    run_worker,
    schemaless_record,
    sink_env,
)
from tests.support.stack import Endpoints

TS = 1_900_000_000_000_000


def insert(i: int, keyspace: str, v3: int = 1) -> tuple[bytes, bytes]:
    cells = {"v1": (i, None), "v2": (f"s{i}", None), "v3": (v3, None)}
    return schemaless_record(Mutation("insert", TS + i, (0, "p", i, "x"), cells), keyspace)


def offsets(span: Span) -> set[int]:
    """The offsets a batch span says it holds ("topic[p]:first..last", inclusive)."""
    held: set[int] = set()
    for text in span.attributes["cdc.offsets"]:
        first, last = text.rpartition(":")[2].split("..")
        held.update(range(int(first), int(last) + 1))
    return held


def descendants(collector: Collector, span: Span) -> list[Span]:
    found = []
    for child in collector.children(span):
        found += [child, *descendants(collector, child)]
    return found


async def rows_in(dsn: str, schema: str) -> int:
    return int(await fetch_value(dsn, f"SELECT count(*) FROM {schema}.cdc_model"))


async def test_each_batch_is_a_trace_of_its_transactions_dead_letters_and_splits(
    stack: Endpoints, unique: Unique
) -> None:
    """A chunk holding an undecodable record and one PostgreSQL refuses: the exported trace
    shows the chunk's batch span (its offsets, outcome `split`), its preparing, the dead
    letter produced, the halves down to the one record dead-lettered and the failed
    transaction with PostgreSQL's error; every batch's log lines carry its trace id; a
    reconciliation job is a span with what it found."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("traced")
    topic = unique("cdc-events-traced")
    service = unique("cdc-sink-traced")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, 1)
    env = sink_env(
        stack,
        topic=topic,
        group=unique("g"),
        schema=schema,
        dlq__topic=unique("dlq-traced"),
        dlq__max_share="1",
        log__level="info",
    )
    await produce(stack.kafka, topic, [insert(i, keyspace) for i in range(10)])
    await run_worker(env)  # makes the table, untraced; then a rule the next lot breaks
    await fetch_value(
        stack.postgres_dsn,
        f"ALTER TABLE {schema}.cdc_model ADD CONSTRAINT no_13 CHECK (v3 IS DISTINCT FROM 13)",
    )
    lot = [insert(i, keyspace) for i in range(10, 30)]
    lot.insert(7, insert(99, keyspace, v3=13))
    lot.insert(3, (b"k", b"\xff\xfe not an event"))
    await produce(stack.kafka, topic, lot)

    with otlp_collector() as (collector, endpoint):
        traced = {
            **env,
            "CDC_TRACING__ENDPOINT": endpoint,
            "CDC_TRACING__SAMPLE_RATIO": "1",
            "CDC_TRACING__SERVICE_NAME": service,
        }
        run = run_cli(traced, "run", "--stop-when-caught-up")
        assert run.returncode == 0, run.stderr[-3000:]
        job = run_cli(traced, "reconcile", "run", "--table", "model", "--strategy", "row_count")
        assert job.returncode == 0, job.stderr[-3000:]

        assert {s.resource["service.name"] for s in collector.spans} == {service}
        roots = [s for s in collector.named("cdc.batch") if not s.parent_id]
        held = set().union(*(offsets(s) for s in roots))
        assert held == set(range(10, 10 + len(lot)))  # each record in exactly one trace
        assert sum(len(offsets(s)) for s in roots) == len(lot)
        [split] = [s for s in roots if s.attributes["cdc.outcome"] == "split"]
        assert split.attributes["cdc.dead_letters"] == 1  # the undecodable one
        below = descendants(collector, split)
        assert {s.trace_id for s in below} == {split.trace_id}
        assert [s.name for s in below].count("cdc.prepare") >= 3  # the chunk, its halves
        [letter] = [
            s
            for s in below
            if s.name == "cdc.batch" and s.attributes["cdc.outcome"] == "dead_lettered"
        ]
        assert offsets(letter) == {10 + 8}  # the record v3 = 13 (after the undecodable)
        refused = [s for s in below if s.name == "cdc.transaction" and s.failed]
        assert refused
        assert all(s.exceptions == ["asyncpg.exceptions.CheckViolationError"] for s in refused)
        produced = [s for s in below if s.name == "cdc.dlq.produce"]
        assert sum(s.attributes["cdc.letters"] for s in produced) == 2
        for batch in collector.named("cdc.batch"):
            assert batch.start_ns <= batch.end_ns
            if batch.attributes["cdc.outcome"] == "committed":
                attempts = [c for c in collector.children(batch) if c.name == "cdc.transaction"]
                assert attempts
                assert not attempts[-1].failed

        lines = json_lines(run.stderr)
        committed = [line for line in lines if line["event"] == "batch_committed"]
        assert committed
        span_ids = {s.span_id for s in collector.named("cdc.batch")}
        assert all(line["span_id"] in span_ids for line in committed)
        lettered = [line for line in lines if line["event"] == "dead_lettered"]
        assert len(lettered) == 2
        assert {line["trace_id"] for line in lettered} == {split.trace_id}

        [recon] = collector.named("cdc.reconciliation")
        assert recon.attributes["cdc.strategy"] == "row_count"
        assert recon.attributes["cdc.mismatches"] == 30  # Cassandra holds none of them
        assert not recon.failed
    assert await rows_in(stack.postgres_dsn, schema) == 30


async def test_a_collector_away_or_batches_not_sampled_hold_nothing_back(
    stack: Endpoints, unique: Unique
) -> None:
    """With nothing listening at the endpoint the worker applies every record, says once that
    export failed, and exits within its export timeout; at a sample ratio of 0 nothing is
    exported and no log line claims a trace id."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("untraced")
    topic = unique("cdc-events-untraced")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, 2)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, log__level="info")
    await produce(stack.kafka, topic, [insert(i, keyspace) for i in range(50)])
    with otlp_collector() as (collector, endpoint):
        pass  # its port is closed again: a collector that is away
    away = {
        **env,
        "CDC_TRACING__ENDPOINT": endpoint,
        "CDC_TRACING__SAMPLE_RATIO": "1",
        "CDC_TRACING__EXPORT_TIMEOUT_SECONDS": "2",
    }
    run = run_cli(away, "run", "--stop-when-caught-up", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = json_lines(run.stderr)
    assert any(line["event"] == "caught_up" for line in lines)
    exporter = [line for line in lines if line.get("logger", "").startswith("opentelemetry")]
    assert exporter, run.stderr[-3000:]
    assert len(exporter) <= 3  # shown once per message, not once per try
    assert await rows_in(stack.postgres_dsn, schema) == 50

    await produce(stack.kafka, topic, [insert(i, keyspace) for i in range(50, 80)])
    with otlp_collector() as (collector, endpoint):
        unsampled = {**env, "CDC_TRACING__ENDPOINT": endpoint, "CDC_TRACING__SAMPLE_RATIO": "0"}
        run = run_cli(unsampled, "run", "--stop-when-caught-up")
        assert run.returncode == 0, run.stderr[-3000:]
        assert collector.spans == []
    committed = [line for line in json_lines(run.stderr) if line["event"] == "batch_committed"]
    assert committed
    assert not any("trace_id" in line for line in committed)
    assert await rows_in(stack.postgres_dsn, schema) == 80
