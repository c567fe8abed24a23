"""Hostile input at the wire level: damaged Debezium JSON and Avro records (cut short, nested
tens of thousands deep, numbers and strings of a megabyte, fields of the wrong type, random
bytes, schema ids no registry issued, records of several megabytes) among good ones, through
one worker process (`python -m cdc_sink run`) that lives through every run.

Hypothesis draws the runs (tests/support/hostile.py), derandomized and without shrinking: each
example costs seconds of the real stack. Every run goes to one topic, into a table of its own.
`CDC_TEST_HOSTILE_EXAMPLES` (default 30) sets how many runs, `CDC_TEST_HOSTILE_KINDS` (comma-
separated, default all) which damage every run carries, and `CDC_TEST_HOSTILE_MEMORY_MB`
(default 2048) the worker's address-space limit, so a record that inflates the worker ends it
with a MemoryError instead of exhausting the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import resource
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cassandra.cluster import Session
from hypothesis import HealthCheck, Phase, given, settings
from prometheus_client.parser import text_string_to_metric_families

from cdc_sink.retry import backoff_delay
from tests.support.hostile import (
    DAMAGE_KINDS,
    PARTITIONS,
    ROW_COLUMNS,
    TABLE_CQL,
    TOPIC_MAX_MESSAGE_BYTES,
    HostileRun,
    Placed,
    SchemaIds,
    Wire,
    hostile_runs,
    register_schemas,
    row_differences,
)
from tests.support.pipeline import (
    create_topic,
    drop_schema,
    http_get,
    kill,
    listening_port,
    produce_placed,
    read_rows,
    read_topic,
    sink_env,
    start_worker_process,
)
from tests.support.recon_data import cassandra_session
from tests.support.stack import Endpoints
from tests.support.topics import unique_name

EXAMPLES = int(os.environ.get("CDC_TEST_HOSTILE_EXAMPLES", "30"))
KINDS = tuple(os.environ.get("CDC_TEST_HOSTILE_KINDS", ",".join(DAMAGE_KINDS)).split(","))
assert set(KINDS) <= set(DAMAGE_KINDS), f"CDC_TEST_HOSTILE_KINDS: choose among {DAMAGE_KINDS}"
MEMORY_LIMIT = int(os.environ.get("CDC_TEST_HOSTILE_MEMORY_MB", "2048")) * 1024 * 1024

# The worker's retry policy, and the longest a batch may wait under it: every backoff step at
# the top of its jitter range, up to the last attempt.
RETRY_ATTEMPTS, RETRY_BASE_S, RETRY_MAX_S = 5, 1.0, 8.0


class _TopOfRange(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


LONGEST_WAIT_S = sum(
    backoff_delay(attempt, RETRY_BASE_S, RETRY_MAX_S, _TopOfRange())
    for attempt in range(RETRY_ATTEMPTS - 1)
)
# Past the bound, keep waiting this long more, to tell a slow run from a stuck one.
STUCK_AFTER_S = LONGEST_WAIT_S + 45
DLQ_RECORD_KEPT_WHOLE = 1024 * 1024  # up to Kafka's default record size, the bytes must be equal


@dataclass(repr=False)
class HostileSink:
    """One worker process for the whole module, and what the runs need around it."""

    stack: Endpoints
    loop: asyncio.AbstractEventLoop
    cassandra: Session
    process: subprocess.Popen[bytes]
    log: Path
    topic: str
    dlq_topic: str
    group: str
    schema: str
    keyspace: str
    ids: SchemaIds
    http_port: int = 0
    tables: Iterator[int] = field(default_factory=itertools.count)
    # The DLQ topic's next offset per partition after the runs checked so far: every earlier
    # run's dead letters were produced before their checkpoints moved, so none come later.
    dlq_read: dict[int, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"HostileSink(pid={self.process.pid}, topic={self.topic!r}, log={self.log})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def assert_alive(self) -> None:
        assert self.process.poll() is None, (
            f"the worker exited ({self.process.returncode}):\n{self.log_tail()}"
        )

    def new_table(self) -> str:
        """A Cassandra table of its own for a run (the sink reads its column types there)."""
        table = f"t{next(self.tables)}"
        self.cassandra.execute(TABLE_CQL.format(ks=self.keyspace, table=table))
        return table

    async def checkpoints(self) -> dict[int, int]:
        conn = await asyncpg.connect(self.stack.postgres_dsn)
        try:
            rows = await conn.fetch(
                f'SELECT kafka_partition, next_offset FROM "{self.schema}"._cdc_checkpoints '
                "WHERE consumer_group = $1 AND topic = $2",
                self.group,
                self.topic,
            )
        except asyncpg.UndefinedTableError:
            return {}
        finally:
            await conn.close()
        return {r["kafka_partition"]: r["next_offset"] for r in rows}

    async def wait_applied(self, ends: dict[int, int]) -> float:
        """Seconds until every partition's checkpoint reaches its end offset in `ends`; fails
        if the worker exits or STUCK_AFTER_S passes first."""
        began = time.monotonic()
        while True:
            self.assert_alive()
            done = await self.checkpoints()
            if all(done.get(p, 0) >= end for p, end in ends.items()):
                return time.monotonic() - began
            waited = time.monotonic() - began
            assert waited < STUCK_AFTER_S, (
                f"not applied after {waited:.0f} s: checkpoints {done}, ends {ends}\n"
                f"{self.log_tail()}"
            )
            await asyncio.sleep(0.1)

    async def dead_letter_rows(self) -> dict[tuple[int, int], asyncpg.Record]:
        conn = await asyncpg.connect(self.stack.postgres_dsn)
        try:
            rows = await conn.fetch(
                "SELECT source_partition, source_offset, error_class, stage, error_message "
                f'FROM "{self.schema}"._cdc_dlq_records WHERE source_topic = $1',
                self.topic,
            )
        finally:
            await conn.close()
        return {(r["source_partition"], r["source_offset"]): r for r in rows}

    def retries(self) -> float:
        """Retries and transient failures the worker counted, from its /metrics."""
        status, body = http_get(self.http_port, "/metrics")
        assert status == 200, body
        return sum(
            sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == "cdc_retries_total"
            or (sample.name == "cdc_errors_total" and sample.labels.get("kind") == "transient")
        )


@pytest.fixture(scope="module")
def hostile_sink(
    stack: Endpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostileSink]:
    """The topic (8 partitions, records up to 16 MiB), the run's schemas in the registry, a
    Cassandra keyspace, and one worker, limited in address space, with the DLQ share limit
    off (a run may be mostly damage) and a short retry policy."""
    topic, keyspace = unique_name("cdc-events-hostile"), unique_name("hostile")
    loop = asyncio.new_event_loop()
    limit = {"max.message.bytes": str(TOPIC_MAX_MESSAGE_BYTES)}
    loop.run_until_complete(create_topic(stack.kafka, topic, PARTITIONS, limit))
    cassandra = cassandra_session(stack)
    cassandra.execute(
        f"CREATE KEYSPACE {keyspace} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    ids = register_schemas(stack.schema_registry_url, topic)
    group, schema, dlq_topic = unique_name("g"), unique_name("hostile"), unique_name("dlq-events")
    env = sink_env(
        stack,
        topic=topic,
        group=group,
        schema=schema,
        dlq__topic=dlq_topic,
        dlq__max_share="1",
        sink__retry_attempts=str(RETRY_ATTEMPTS),
        sink__retry_base_seconds=str(RETRY_BASE_S),
        sink__retry_max_seconds=str(RETRY_MAX_S),
        log__level="info",
    )
    log = tmp_path_factory.mktemp("hostile") / "worker.log"
    process = start_worker_process(env, log, stop_when_caught_up=False)
    resource.prlimit(process.pid, resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    sink = HostileSink(
        stack, loop, cassandra, process, log, topic, dlq_topic, group, schema, keyspace, ids
    )
    try:
        sink.http_port = loop.run_until_complete(started(sink))
        yield sink
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                kill(process)
        cassandra.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        cassandra.cluster.shutdown()
        loop.run_until_complete(drop_schema(stack.postgres_dsn, schema))
        loop.close()


async def started(sink: HostileSink) -> int:
    """Wait until the worker owns every partition; return its probes listener's port."""
    async with asyncio.timeout(90):
        while len(await sink.checkpoints()) < PARTITIONS:
            sink.assert_alive()
            await asyncio.sleep(0.2)
    port = listening_port(sink.log.read_text(), "probes")
    assert port is not None
    return port


@pytest.mark.timeout(120 + EXAMPLES * (STUCK_AFTER_S + 90))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
    print_blob=False,
)
@given(run=hostile_runs(KINDS))
def test_damaged_records_are_dead_lettered_and_the_good_ones_applied(
    hostile_sink: HostileSink, run: HostileRun
) -> None:
    """After each run the same worker process still runs, its table equals the model of the
    good records, every damaged record is in the DLQ topic and `_cdc_dlq_records` (and no good
    one), no retry was counted (poison is never transient), and the run was applied within the
    longest wait the retry policy allows a batch (LONGEST_WAIT_S, 15 s). The stack is healthy,
    so no batch should wait at all; a run is applied no sooner than its slowest batch, so one
    that waited longer than the policy allows for anything (the registry asked again for each
    unknown id, a conversion of a huge number that takes minutes) fails the run, and one stuck
    for good fails it at STUCK_AFTER_S."""
    hostile_sink.loop.run_until_complete(check_run(hostile_sink, run))


async def check_run(sink: HostileSink, run: HostileRun) -> None:
    """Produce the run into a table of its own, wait until every offset is applied, check."""
    table = sink.new_table()
    records = run.records(Wire(sink.keyspace, table, sink.ids))
    positions = await produce_placed(
        sink.stack.kafka,
        sink.topic,
        [(r.partition, r.key, r.value) for r in records],
        max_request_size=TOPIC_MAX_MESSAGE_BYTES,
    )
    ends: dict[int, int] = {}
    for partition, offset in positions:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    took = await sink.wait_applied(ends)
    sink.assert_alive()

    rows = await read_rows(sink.stack.postgres_dsn, sink.schema, f"cdc_{table}", ROW_COLUMNS)
    differences = row_differences(rows, run.expected_rows())
    assert not differences, "rows differ from the model:\n" + "\n".join(differences[:20])

    placed = dict(zip(positions, records, strict=True))
    bad = {position for position, record in placed.items() if record.damage is not None}
    letters = {p: r for p, r in (await sink.dead_letter_rows()).items() if p in placed}
    assert letters.keys() == bad, "in _cdc_dlq_records:\n" + mismatch(placed, bad, letters.keys())
    for row in letters.values():
        assert all(row[c] for c in ("error_class", "stage", "error_message")), dict(row)
        # A damaged record must get a clear error: UnexpectedError means the sink's own code
        # failed on it (a defect, README "Failures and the dead-letter queue").
        assert row["error_class"] != "UnexpectedError", dict(row)

    in_topic: dict[tuple[int, int], Any] = {}
    for message in await read_topic(sink.stack.kafka, sink.dlq_topic, sink.dlq_read):
        sink.dlq_read[message.partition] = message.offset + 1
        headers = {k: (v or b"").decode() for k, v in message.headers}
        position = (int(headers["cdc.source.partition"]), int(headers["cdc.source.offset"]))
        if headers["cdc.source.topic"] == sink.topic and position in placed:
            assert all(headers[f"cdc.error.{h}"] for h in ("class", "message", "stage")), headers
            in_topic[position] = message
    assert in_topic.keys() == bad, "in the DLQ topic:\n" + mismatch(placed, bad, in_topic.keys())
    for position, message in in_topic.items():
        record = placed[position]
        if len(record.value or b"") + len(record.key or b"") <= DLQ_RECORD_KEPT_WHOLE:
            assert (message.key, message.value) == (record.key, record.value), record.damage

    assert await asyncio.to_thread(sink.retries) == 0, sink.log_tail()
    assert took <= LONGEST_WAIT_S, (
        f"the run took {took:.1f} s to apply after it was produced; a batch may wait at most "
        f"{LONGEST_WAIT_S:.0f} s under the retry policy"
    )
    sink.assert_alive()


def mismatch(placed: dict[tuple[int, int], Placed], bad: set[tuple[int, int]], found: Any) -> str:
    """Which damaged records are missing and which good ones are there, one line each."""
    lines = [f"missing {p}: {placed[p].damage}" for p in sorted(bad - set(found))]
    lines += [f"good record dead-lettered: {p}" for p in sorted(set(found) - bad)]
    return "\n".join(lines[:20])
