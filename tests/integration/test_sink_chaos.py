"""Chaos: PostgreSQL and Kafka fail under a running worker, which must ride it out.

Each test streams the same history of mutations (three replica copies) through one worker
process, breaks something in the middle of the stream, and then checks that the same process
(never restarted) applied every offset exactly once and left exactly the rows Cassandra's
SELECT returns. Services are stopped and started through `deploy/local/stack`, so these tests
need a stack that script controls (CDC_STACK_HOME in the stack's endpoints); every test leaves
the services running, also when it fails. Run them against a private stack while others use
the shared one (README: "A second stack").
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.support.cassandra_model import COLUMNS, expected_rows, replica_streams
from tests.support.names import Unique
from tests.support.pipeline import (
    applied,
    create_cassandra_model_table,
    create_topic,
    dead_letters,
    kafka_offsets,
    kill,
    produce,
    random_history,
    read_rows,
    schemaless_record,
    sink_env,
    start_worker_process,
)
from tests.support.stack import Endpoints, stack_command
from tests.support.tcp_proxy import TcpProxy

MUTATIONS = 4_000  # x 3 replica copies = 12,000 events per test
SHUTDOWN_TIMEOUT_S = 30.0  # the worker's default CDC_SINK__SHUTDOWN_TIMEOUT_SECONDS
# Backoff steps of at most 2 s, and enough attempts that an outage of a few seconds can never
# exhaust them: the worker must wait it out, not give up.
RETRIES = {
    "sink__retry_base_seconds": "0.2",
    "sink__retry_max_seconds": "2",
    "sink__retry_attempts": "40",
    "sink__batch_size": "200",
}


@dataclass(frozen=True)
class Stream:
    """Kafka records to deliver in order, and the rows Cassandra returns after all of them."""

    keyspace: str
    records: list[tuple[bytes, bytes]]
    expected: dict[tuple[Any, ...], dict[str, Any]]


@pytest.fixture(scope="module")
def stream(stack: Endpoints) -> Stream:
    tag = f"{int(time.time())}{random.randrange(1000):03d}"
    rng = random.Random(tag)
    history = random_history(rng, MUTATIONS, keys=1_500, base_ts=1_900_000_000_000_000)
    deliveries = replica_streams(history, iter(lambda: rng.randrange(1 << 30), None))
    keyspace = f"chaos{tag}"
    create_cassandra_model_table(stack, keyspace)
    records = [schemaless_record(m, keyspace) for m in deliveries]
    return Stream(keyspace, records, expected_rows(history))


def service_pid(stack: Endpoints, service: str) -> int:
    return int((Path(stack["CDC_STACK_HOME"]) / "run" / service / "pid").read_text())


@pytest.fixture
def services_restored(stack: Endpoints, unique: Unique) -> Iterator[None]:
    """Whatever happens in the test, PostgreSQL and Kafka are up again afterwards, before the
    test's schemas are dropped (this fixture asks for `unique` so that it ends first)."""
    try:
        yield
    finally:
        stack_command(stack, "up", "postgres", "kafka")


@dataclass
class Outcome:
    """What a chaos run measured."""

    applied_at_fault: int
    shutdown_s: float
    log: str


async def stream_through_fault(
    stack: Endpoints,
    stream: Stream,
    unique: Unique,
    tmp_path: Path,
    fault: Callable[[], Awaitable[None]],
    *,
    kafka: str | None = None,
    postgres_dsn: str | None = None,
) -> Outcome:
    """Produce two thirds of the stream, start a worker, let it apply some, run `fault`,
    produce the rest, wait until every offset is stored, stop the worker with SIGTERM, and
    check: the worker never exited before, exact rows, every offset once, nothing dead-lettered.
    `kafka` / `postgres_dsn` are the addresses the worker uses (a proxy), if not the stack's."""
    topic, schema = unique("cdc-events-chaos"), unique.schema("chaos")
    total = len(stream.records)
    first = total * 2 // 3
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, stream.records[:first])
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, **RETRIES)
    env["CDC_LOG__LEVEL"] = "info"
    if kafka:
        env["CDC_KAFKA__BOOTSTRAP_SERVERS"] = kafka
    if postgres_dsn:
        env["CDC_POSTGRES__DSN"] = postgres_dsn
    log = tmp_path / "worker.log"
    worker = start_worker_process(env, log, stop_when_caught_up=False)
    try:
        async with asyncio.timeout(120):
            while await applied(stack.postgres_dsn, schema) < total // 10:
                assert worker.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.05)
        at_fault = await applied(stack.postgres_dsn, schema)
        await fault()
        await produce(stack.kafka, topic, stream.records[first:])
        async with asyncio.timeout(300):
            while await applied(stack.postgres_dsn, schema) < total:
                assert worker.poll() is None, "the worker exited:\n" + log.read_text()[-4000:]
                await asyncio.sleep(0.2)
        assert worker.poll() is None, log.read_text()[-3000:]
        shutdown_s = await terminate(worker)
        assert worker.returncode == 0, log.read_text()[-3000:]
        assert await applied(stack.postgres_dsn, schema) == total
        rows = await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS)
        assert rows == stream.expected
        assert await dead_letters(stack.postgres_dsn, schema) == 0
        print(f"fault after {at_fault:,}/{total:,} applied; SIGTERM to exit: {shutdown_s:.2f} s")
        return Outcome(at_fault, shutdown_s, log.read_text())
    finally:
        kill(worker)


async def terminate(worker: subprocess.Popen[bytes]) -> float:
    """SIGTERM; wait for the exit (at most the shutdown timeout and a margin); seconds taken."""
    began = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    await asyncio.to_thread(worker.wait, SHUTDOWN_TIMEOUT_S + 10)
    return time.monotonic() - began


async def kafka_committed(bootstrap: str, group: str) -> int:
    """The sum of the offsets the group committed to Kafka."""
    return sum(o for o in (await kafka_offsets(bootstrap, group)).values() if o > 0)


def json_lines(log: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines (anything else it printed is skipped)."""
    found = []
    for line in log.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def logged(log: str, event: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines that carry this event name."""
    return [entry for entry in json_lines(log) if entry.get("event") == event]


def assert_retried_on_fresh_connections(log: str) -> None:
    """The writer retried, and never on a connection it had already handed back to the pool
    (after a failed reconnect it has none, and the next attempt opens one)."""
    retries = logged(log, "write_retry")
    assert retries
    assert not [r for r in retries if "released back to the pool" in r["error"]], retries


# --- PostgreSQL and Kafka stopped -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["--immediate", "--fast"])
async def test_postgres_stopped_mid_stream(
    stack: Endpoints,
    stream: Stream,
    unique: Callable[[str], str],
    tmp_path: Path,
    services_restored: None,
    mode: str,
) -> None:
    """PostgreSQL stopped (immediate mode: connections just break; fast mode: sessions get
    57P01 admin shutdown, new ones 57P03 while it starts) for longer than a backoff step, then
    started: the same worker process retries, resumes, and the tables and offsets are exact."""
    down = ["down", "postgres"] + (["--immediate"] if mode == "--immediate" else [])

    async def fault() -> None:
        await asyncio.to_thread(stack_command, stack, *down)
        await asyncio.sleep(4)  # longer than any backoff step (2 s)
        await asyncio.to_thread(stack_command, stack, "up", "postgres")

    outcome = await stream_through_fault(stack, stream, unique, tmp_path, fault)
    assert_retried_on_fresh_connections(outcome.log)


@pytest.mark.parametrize("mode", ["--clean", "--immediate"])
async def test_kafka_broker_restarted_mid_stream(
    stack: Endpoints,
    stream: Stream,
    unique: Callable[[str], str],
    tmp_path: Path,
    services_restored: None,
    mode: str,
) -> None:
    """The Kafka broker restarted (a clean shutdown, or killed) while the worker streams: the
    same process reconnects, rejoins its group and finishes with exact tables and offsets."""
    broker = service_pid(stack, "kafka")
    restart = ["restart", "kafka"] + (["--immediate"] if mode == "--immediate" else [])

    async def fault() -> None:
        await asyncio.to_thread(stack_command, stack, *restart)

    await stream_through_fault(stack, stream, unique, tmp_path, fault)
    assert service_pid(stack, "kafka") != broker


# --- connections cut and delayed --------------------------------------------------------------


async def flaky_network(proxy: TcpProxy) -> None:
    """Three rounds of: slow links for a second, then every connection reset and the port
    closed for longer than a backoff step."""
    for _ in range(3):
        proxy.latency_s = 0.05
        await asyncio.sleep(1)
        proxy.latency_s = 0.0
        await proxy.outage(3)


async def test_postgres_connections_cut_and_delayed(
    stack: Endpoints, stream: Stream, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """Every PostgreSQL connection of the worker goes through a proxy that delays, resets and
    refuses: the same process finishes with exact tables and offsets."""
    dsn = stack.postgres_dsn
    host_port = dsn.rsplit("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    async with TcpProxy(host, int(port)) as proxy:
        via_proxy = dsn.replace(f"@{host_port}/", f"@{proxy.address}/")

        async def fault() -> None:
            await flaky_network(proxy)

        outcome = await stream_through_fault(
            stack, stream, unique, tmp_path, fault, postgres_dsn=via_proxy
        )
    assert proxy.cuts >= 3
    assert_retried_on_fresh_connections(outcome.log)


async def test_kafka_connections_cut_and_delayed(
    stack: Endpoints, stream: Stream, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """Every Kafka connection of the worker (bootstrap, group coordinator, fetches, commits)
    goes through a proxy that delays, resets and refuses: the same process finishes with
    exact tables and offsets."""
    listen = int(stack["CDC_STACK_KAFKA_VIA_PROXY"].rsplit(":", 1)[1])
    upstream_host, upstream_port = stack["CDC_STACK_KAFKA_PROXIED"].rsplit(":", 1)
    async with TcpProxy(upstream_host, int(upstream_port), port=listen) as proxy:

        async def fault() -> None:
            await flaky_network(proxy)

        await stream_through_fault(
            stack, stream, unique, tmp_path, fault, kafka=stack["CDC_STACK_KAFKA_VIA_PROXY"]
        )
    assert proxy.cuts >= 3
    # the broker advertised the proxy, so the worker reconnected through it after each cut
    assert proxy.accepted >= 4


# --- SIGTERM ----------------------------------------------------------------------------------


async def test_sigterm_mid_stream_then_restart(
    stack: Endpoints, stream: Stream, unique: Unique, tmp_path: Path
) -> None:
    """SIGTERM while a backlog is being applied: the worker exits 0 within the shutdown
    timeout with part of the stream applied; a restarted worker applies the rest, and the
    tables and offsets equal one uninterrupted run (nothing lost, nothing applied twice)."""
    topic, schema, group = unique("cdc-events-term"), unique.schema("term"), unique("g")
    total = len(stream.records)
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, stream.records)
    env = sink_env(stack, topic=topic, group=group, schema=schema, **RETRIES)
    log = tmp_path / "worker.log"
    worker = start_worker_process(env, log, stop_when_caught_up=False)
    try:
        async with asyncio.timeout(120):
            while await applied(stack.postgres_dsn, schema) < total // 5:
                assert worker.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.02)
        shutdown_s = await terminate(worker)
        assert worker.returncode == 0, log.read_text()[-3000:]
        assert shutdown_s < SHUTDOWN_TIMEOUT_S
        stopped_at = await applied(stack.postgres_dsn, schema)
        print(f"SIGTERM: exit 0 after {shutdown_s:.2f} s, {stopped_at:,}/{total:,} applied")
        assert stopped_at < total  # it really stopped mid-stream
        # what it applied was committed to Kafka too (for lag tooling) before it left
        assert await kafka_committed(stack.kafka, group) == stopped_at
        worker = start_worker_process(env, log)
        assert await asyncio.to_thread(worker.wait, 300) == 0, log.read_text()[-3000:]
        assert await applied(stack.postgres_dsn, schema) == total
        rows = await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS)
        assert rows == stream.expected
        assert await dead_letters(stack.postgres_dsn, schema) == 0
    finally:
        kill(worker)


async def test_sigterm_while_retrying_a_stopped_postgres(
    stack: Endpoints, stream: Stream, unique: Unique, tmp_path: Path, services_restored: None
) -> None:
    """SIGTERM while the worker waits out a retry backoff (PostgreSQL down, steps of up to a
    minute): the wait is interrupted, the batch abandoned uncommitted, exit 0 within the
    shutdown timeout; after PostgreSQL is back a new worker finishes with exact tables."""
    topic, schema = unique("cdc-events-termretry"), unique.schema("termretry")
    total = len(stream.records)
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, stream.records)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, sink__batch_size="200")
    env |= {"CDC_LOG__LEVEL": "info", "CDC_SINK__RETRY_BASE_SECONDS": "5"}
    log = tmp_path / "worker.log"
    worker = start_worker_process(env, log, stop_when_caught_up=False)
    try:
        async with asyncio.timeout(120):
            while await applied(stack.postgres_dsn, schema) < total // 10:
                assert worker.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.02)
        await asyncio.to_thread(stack_command, stack, "down", "postgres", "--immediate")
        async with asyncio.timeout(60):
            while not logged(log.read_text(), "write_retry"):
                assert worker.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.1)
        shutdown_s = await terminate(worker)
        print(f"SIGTERM during a retry backoff: exit {worker.returncode} after {shutdown_s:.2f} s")
        assert worker.returncode == 0, log.read_text()[-3000:]
        assert shutdown_s < SHUTDOWN_TIMEOUT_S
        assert logged(log.read_text(), "batch_abandoned")
        await asyncio.to_thread(stack_command, stack, "up", "postgres")
        worker = start_worker_process(env, log)
        assert await asyncio.to_thread(worker.wait, 300) == 0, log.read_text()[-3000:]
        assert await applied(stack.postgres_dsn, schema) == total
        rows = await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS)
        assert rows == stream.expected
    finally:
        kill(worker)
        await asyncio.to_thread(stack_command, stack, "up", "postgres")


async def claimed_twice(dsn: str, schema: str) -> int:
    """Partitions whose fencing epoch went past the first claim."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(f'SELECT count(*) FROM "{schema}"._cdc_checkpoints WHERE epoch > 1')
        )
    finally:
        await conn.close()


async def test_rebalance_while_postgres_is_unreachable(
    stack: Endpoints, stream: Stream, unique: Unique, tmp_path: Path
) -> None:
    """A worker whose PostgreSQL is unreachable when a rebalance hands it partitions cannot
    claim them then; it claims them once PostgreSQL is back (it does not sit on them unapplied
    for ever), and the two workers finish with exact tables and offsets."""
    topic, schema, group = unique("cdc-events-claim"), unique.schema("claim"), unique("g")
    total = len(stream.records)
    first = total * 2 // 3
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, stream.records[:first])
    env = sink_env(stack, topic=topic, group=group, schema=schema, **RETRIES)
    env["CDC_LOG__LEVEL"] = "info"
    dsn = stack.postgres_dsn
    host_port = dsn.rsplit("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    workers: list[subprocess.Popen[bytes]] = []
    async with TcpProxy(host, int(port)) as proxy:
        try:
            via_proxy = dsn.replace(f"@{host_port}/", f"@{proxy.address}/")
            workers.append(
                start_worker_process(
                    {**env, "CDC_POSTGRES__DSN": via_proxy}, log_a, stop_when_caught_up=False
                )
            )
            async with asyncio.timeout(120):
                while await applied(dsn, schema) < first:
                    assert workers[0].poll() is None, log_a.read_text()[-3000:]
                    await asyncio.sleep(0.1)
            await proxy.refuse()
            proxy.cut()
            workers.append(start_worker_process(env, log_b, stop_when_caught_up=False))
            async with asyncio.timeout(60):  # the second worker claimed its share
                while await claimed_twice(dsn, schema) < 4:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(2)  # the first worker's claims fail meanwhile
            await proxy.start()
            await produce(stack.kafka, topic, stream.records[first:])
            async with asyncio.timeout(120):
                while await applied(dsn, schema) < total:
                    for worker, log in zip(workers, (log_a, log_b), strict=True):
                        assert worker.poll() is None, log.read_text()[-3000:]
                    await asyncio.sleep(0.2)
            for worker in workers:
                await terminate(worker)
                assert worker.returncode == 0
            assert logged(log_a.read_text(), "claim_failed")
            assert await applied(dsn, schema) == total
            rows = await read_rows(dsn, schema, "cdc_model", COLUMNS)
            assert rows == stream.expected
        finally:
            for worker in workers:
                kill(worker)


async def test_postgres_down_when_a_new_table_first_appears(
    stack: Endpoints, stream: Stream, unique: Unique, tmp_path: Path, services_restored: None
) -> None:
    """The first events of a table arrive while PostgreSQL is stopped (the table must be
    looked up and created before anything can be written): the same worker process waits
    for PostgreSQL, creates the table, and finishes with exact tables and offsets."""
    topic, schema = unique("cdc-events-newtable"), unique.schema("newtable")
    total = len(stream.records)
    await create_topic(stack.kafka, topic)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, **RETRIES)
    env["CDC_LOG__LEVEL"] = "info"
    log = tmp_path / "worker.log"
    worker = start_worker_process(env, log, stop_when_caught_up=False)
    try:
        async with asyncio.timeout(120):  # assigned and claimed, nothing to apply yet
            while not logged(log.read_text(), "partitions_assigned"):
                assert worker.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.1)
        await asyncio.to_thread(stack_command, stack, "down", "postgres", "--immediate")
        await produce(stack.kafka, topic, stream.records)
        await asyncio.sleep(4)
        assert worker.poll() is None, "the worker exited:\n" + log.read_text()[-4000:]
        await asyncio.to_thread(stack_command, stack, "up", "postgres")
        async with asyncio.timeout(300):
            while await applied(stack.postgres_dsn, schema) < total:
                assert worker.poll() is None, "the worker exited:\n" + log.read_text()[-4000:]
                await asyncio.sleep(0.2)
        await terminate(worker)
        assert worker.returncode == 0, log.read_text()[-3000:]
        rows = await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS)
        assert rows == stream.expected
        assert await dead_letters(stack.postgres_dsn, schema) == 0
    finally:
        kill(worker)


async def test_sigterm_while_the_broker_is_down(
    stack: Endpoints, stream: Stream, unique: Unique, tmp_path: Path, services_restored: None
) -> None:
    """Kafka stopped mid-stream: what was already fetched is still applied; SIGTERM then: the
    worker's loop is not held up by requests waiting for the broker, so it winds down by
    itself (nothing to cancel) and exits 0 within the shutdown timeout; a new worker then
    finishes with exact tables."""
    topic, schema = unique("cdc-events-termkafka"), unique.schema("termkafka")
    total = len(stream.records)
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, stream.records[: total // 2])
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, **RETRIES)
    env["CDC_LOG__LEVEL"] = "info"
    # Small transactions: one fetch takes many of them, so the broker goes away while the
    # worker still holds fetched records (with 1,000 a fetch may be applied before it dies).
    env["CDC_SINK__BATCH_SIZE"] = "50"
    log = tmp_path / "worker.log"
    worker = start_worker_process(env, log, stop_when_caught_up=False)
    try:
        async with asyncio.timeout(120):  # mid-stream: records fetched and not yet applied
            while await applied(stack.postgres_dsn, schema) < total // 20:
                assert worker.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.02)
        await asyncio.to_thread(stack_command, stack, "down", "kafka", "--immediate")
        at_stop = await applied(stack.postgres_dsn, schema)
        await asyncio.sleep(3)
        # What was fetched before the broker went away is still applied (committing offsets
        # to Kafka, for lag tooling only, does not hold the writes up).
        assert await applied(stack.postgres_dsn, schema) > at_stop, log.read_text()[-6000:]
        shutdown_s = await terminate(worker)
        print(f"SIGTERM with the broker down: exit {worker.returncode} after {shutdown_s:.2f} s")
        assert worker.returncode == 0, log.read_text()[-3000:]
        assert shutdown_s < SHUTDOWN_TIMEOUT_S
        assert not logged(log.read_text(), "shutdown_abandons_batch")
        # aiokafka retries every few milliseconds while the broker is away (hundreds of error
        # lines in these seconds unthinned); each of its warnings and errors is logged once per
        # CDC_LOG__REPEAT_WINDOW_SECONDS (30 s), so none repeats here.
        kafka_noise = [
            entry["event"]
            for entry in json_lines(log.read_text())
            if entry.get("logger", "").startswith("aiokafka")
            and entry.get("level") in ("warning", "error")
        ]
        assert kafka_noise, "the broker went away without aiokafka saying so"
        assert len(kafka_noise) == len(set(kafka_noise)) < 20, kafka_noise
        await asyncio.to_thread(stack_command, stack, "up", "kafka")
        await produce(stack.kafka, topic, stream.records[total // 2 :])
        worker = start_worker_process(env, log)
        assert await asyncio.to_thread(worker.wait, 300) == 0, log.read_text()[-3000:]
        assert await applied(stack.postgres_dsn, schema) == total
        rows = await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS)
        assert rows == stream.expected
    finally:
        kill(worker)
