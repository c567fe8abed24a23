"""The control API's limits against a worker draining a backlog: slow clients are let go,
a thousand requests at once are all answered, no file descriptor is left behind, and the
batches go on committing meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from tests.integration.test_connection_pools import backlog
from tests.support.names import Unique
from tests.support.pipeline import (
    applied,
    create_cassandra_model_table,
    create_topic,
    kill,
    listening_port,
    produce,
    sink_env,
    start_worker_process,
)
from tests.support.stack import Endpoints

BACKLOG = 100_000
CONCURRENT = 1_000
SLOW_CLIENTS = 50


def open_fds(pid: int) -> dict[str, str]:
    """The process's open file descriptors and what each is (a socket, a pipe, a file)."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
    return found


async def slowloris(port: int) -> bytes:
    """Send a request head a byte at a time, never finishing it; what the server sent back
    before it closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = b"GET /dlq HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 10_000
        for byte in head:
            if reader.at_eof():
                break
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.1)
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def one_request(port: int) -> int:
    """GET /dlq?limit=10 on a connection of its own; the status answered (0 if none was)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /dlq?limit=10 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await reader.read()
    except ConnectionError:
        return 0
    finally:
        writer.close()
        await writer.wait_closed()
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


async def test_slow_clients_and_a_thousand_requests_at_once_during_a_drain(
    stack: Endpoints, unique: Unique, tmp_path: Path
) -> None:
    """While a worker drains a backlog: 50 slowloris clients are disconnected once their
    head is late, 1,000 concurrent requests are each answered (200, or 503 past the
    connection cap), batches commit while they run, the whole backlog is applied, and the
    worker holds no more file descriptors afterwards than before."""
    keyspace, topic = unique.keyspace("ks"), unique("cdc-events-limits")
    schema = unique.schema("limits")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, backlog(keyspace, BACKLOG))
    env = sink_env(
        stack,
        topic=topic,
        group=unique("g"),
        schema=schema,
        log__level="info",
        api__request_timeout_s="2",
        pushgateway__url="",
    )
    log_path = tmp_path / "worker.log"
    worker = start_worker_process(env, log_path, stop_when_caught_up=False)
    try:
        async with asyncio.timeout(120):
            while (port := listening_port(log_path.read_text())) is None or await applied(
                stack.postgres_dsn, schema
            ) == 0:
                assert worker.poll() is None, log_path.read_text()[-3000:]
                await asyncio.sleep(0.05)
        # A warm-up first, so that the API's pool holds all its connections.
        assert set(await asyncio.gather(*(one_request(port) for _ in range(20)))) == {200}
        before_fds = len(open_fds(worker.pid))
        slow = [asyncio.create_task(slowloris(port)) for _ in range(SLOW_CLIENTS)]
        await asyncio.sleep(0.5)  # the slow ones hold their connections first
        fired_at = await applied(stack.postgres_dsn, schema)
        statuses = await asyncio.gather(*(one_request(port) for _ in range(CONCURRENT)))
        answered_at = await applied(stack.postgres_dsn, schema)
        async with asyncio.timeout(60):
            cut_off = await asyncio.gather(*slow)
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        # Under load the burst may be refused whole (the cap, or no pool connection in time);
        # once it is over, the API answers again.
        assert await one_request(port) == 200
        assert all(not answer.startswith(b"HTTP/1.1 200") for answer in cut_off)
        assert fired_at < answered_at < BACKLOG  # batches committed while the burst ran
        async with asyncio.timeout(300):
            while await applied(stack.postgres_dsn, schema) < BACKLOG:
                assert worker.poll() is None, log_path.read_text()[-3000:]
                await asyncio.sleep(0.2)
        async with asyncio.timeout(30):  # keep-alive and closing connections wind down
            while len(after_fds := open_fds(worker.pid)) > before_fds:
                await asyncio.sleep(0.2)
        print(
            f"\n{CONCURRENT} concurrent requests: {statuses.count(200)} answered 200, "
            f"{statuses.count(503)} 503 past the connection cap; applied {fired_at:,} → "
            f"{answered_at:,} meanwhile; file descriptors {before_fds} → {len(after_fds)}"
        )
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(worker.wait, 60)
        finally:
            kill(worker)
