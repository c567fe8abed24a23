"""The worker's PostgreSQL connections under a burst of API calls: the writer, the API and
reconciliation each have their own, so the requests all answer, jobs never wait on each other
for a connection, and a backlog keeps draining."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx2 as httpx

from cdc_sink.app import SinkApp
from cdc_sink.config import load_config
from tests.support.cassandra_model import Mutation
from tests.support.names import Unique
from tests.support.pipeline import (
    applied,
    create_cassandra_model_table,
    create_topic,
    kill,
    listening_port,
    produce,
    schemaless_record,
    sink_env,
    start_worker_process,
)
from tests.support.stack import Endpoints

BACKLOG = 300_000
JOB_REQUESTS = 20
LIST_REQUESTS = 200
TS = 1_900_000_000_000_000


def backlog(keyspace: str, count: int = BACKLOG) -> list[tuple[bytes, bytes]]:
    """`count` inserts of distinct rows."""
    return [
        schemaless_record(
            Mutation("insert", TS + i, (i % 2, f"p{i % 97}", i, "x"), {"v1": (i, None)}), keyspace
        )
        for i in range(count)
    ]


Sample = tuple[float, int, tuple[float, ...]]  # time, records applied, CPU seconds used


def cpu_seconds(pids: list[int]) -> tuple[float, ...]:
    """The CPU time (user + system, all threads) each process has used so far."""
    used = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return tuple(used)


def cassandra_pid(stack: Endpoints) -> list[int]:
    """The local stack's Cassandra node, whose CPU the jobs use too (none on other stacks)."""
    pid_file = Path(stack.get("CDC_STACK_HOME") or "/nonexistent") / "run" / "cassandra" / "pid"
    return [int(pid_file.read_text())] if pid_file.exists() else []


async def drain(dsn: str, schema: str, worker: Any, until: int, watched: list[int]) -> list[Sample]:
    """(time, records applied, CPU seconds of the worker and of `watched`) every 50 ms from
    the first committed batch until `until` records are applied (start-up left out)."""
    progress: list[Sample] = []
    pids = [worker.pid, *watched]
    async with asyncio.timeout(600):
        while (done := await applied(dsn, schema)) == 0:
            assert worker.poll() is None
            await asyncio.sleep(0.05)
        progress.append((time.monotonic(), done, cpu_seconds(pids)))
        while done < until:
            await asyncio.sleep(0.05)
            assert worker.poll() is None
            done = await applied(dsn, schema)
            progress.append((time.monotonic(), done, cpu_seconds(pids)))
    return progress


def cpu_used(progress: list[Sample], low: int, high: int) -> tuple[float, ...]:
    """CPU seconds each watched process used while the applied count went from `low` to
    `high` (to the nearest samples)."""
    first = next(cpu for _, n, cpu in progress if n >= low)
    last = next(cpu for _, n, cpu in progress if n >= high)
    return tuple(b - a for a, b in zip(first, last, strict=True))


def rate(progress: list[Sample], low: int, high: int) -> float:
    """Events per second while the applied count went from `low` to `high` (times
    interpolated between the samples)."""

    def when(count: int) -> float:
        for (t0, n0, _), (t1, n1, _) in itertools.pairwise(progress):
            if n0 <= count <= n1:
                return t0 if n1 == n0 else t0 + (t1 - t0) * (count - n0) / (n1 - n0)
        raise AssertionError(f"{count} is outside the drain")

    return (high - low) / (when(high) - when(low))


async def stop(worker: Any) -> int:
    os.killpg(worker.pid, signal.SIGTERM)
    return int(await asyncio.to_thread(worker.wait, 60))


async def test_bursts_of_jobs_and_listings_all_answer_while_a_backlog_drains(
    stack: Endpoints, unique: Unique, tmp_path: Path
) -> None:
    """20 concurrent reconciliation job requests and 200 concurrent list requests at a worker
    draining a backlog of 300,000 events: every request answers, every job accepted runs to
    its end, and the whole backlog is applied. The drain's rate while the requests and their
    jobs are served is printed next to that of a quiet run over the same stretch of the
    backlog."""
    keyspace, topic = unique.keyspace("ks"), unique("cdc-events-pools")
    quiet_schema, busy_schema = unique.schema("quiet"), unique.schema("busy")
    dsn = stack.postgres_dsn
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    await produce(stack.kafka, topic, backlog(keyspace))

    def env(schema: str) -> dict[str, str]:
        return sink_env(
            stack,
            topic=topic,
            group=unique("g"),
            schema=schema,
            http__host="127.0.0.1",
            log__level="info",
            pushgateway__url="",
            # Room for the whole burst: the cap's own 503s are test_api_limits' subject, and
            # which requests it refuses depends on when the loop reads them (all the jobs, at
            # times).
            api__max_connections=str(2 * (JOB_REQUESTS + LIST_REQUESTS)),
        )

    # The quiet run stops by itself once caught up: a SIGTERM could meet it on its way out,
    # after it has given the signal back to Python's default.
    watched = cassandra_pid(stack)
    loads = [os.getloadavg()[0]]
    quiet = start_worker_process(env(quiet_schema), tmp_path / "quiet.log")
    try:
        quiet_drain = await drain(dsn, quiet_schema, quiet, BACKLOG, watched)
        assert await asyncio.to_thread(quiet.wait, 60) == 0
    finally:
        kill(quiet)

    loads.append(os.getloadavg()[0])
    log_path = tmp_path / "busy.log"
    busy = start_worker_process(env(busy_schema), log_path, stop_when_caught_up=False)
    try:
        measuring = asyncio.create_task(drain(dsn, busy_schema, busy, BACKLOG, watched))
        async with asyncio.timeout(120):
            while (port := listening_port(log_path.read_text())) is None or await applied(
                dsn, busy_schema
            ) < BACKLOG // 10:
                assert busy.poll() is None, log_path.read_text()[-3000:]
                await asyncio.sleep(0.05)
        fired_at = await applied(dsn, busy_schema)
        answers, jobs = await burst(f"http://127.0.0.1:{port}")
        answered_at = await applied(dsn, busy_schema)
        assert fired_at < BACKLOG  # the requests met a draining worker
        assert sum(answers.values()) == JOB_REQUESTS + LIST_REQUESTS
        assert set(answers) <= {200, 202, 503}, answers
        assert jobs, "no job request was accepted"
        async with httpx.AsyncClient(timeout=30) as client:
            async with asyncio.timeout(240):
                for job in jobs:
                    while (
                        status := (
                            await client.get(f"http://127.0.0.1:{port}/reconciliation/jobs/{job}")
                        ).json()["status"]
                    ) in ("pending", "running"):
                        await asyncio.sleep(0.2)
                    assert status == "succeeded", job
        jobs_done_at = min(await applied(dsn, busy_schema), BACKLOG)
        busy_drain = await measuring
        loads.append(os.getloadavg()[0])
    finally:
        assert await stop(busy) == 0, log_path.read_text()[-3000:]
    assert await applied(dsn, busy_schema) == BACKLOG
    # The burst's window: from the requests to the end of the last job they started (or of the
    # drain), compared with the quiet run over the same stretch of the backlog.
    window = (fired_at, max(jobs_done_at, fired_at + BACKLOG // 10))
    quiet_rate, busy_rate = rate(quiet_drain, *window), rate(busy_drain, *window)
    whole = (
        rate(quiet_drain, quiet_drain[0][1], BACKLOG),
        rate(busy_drain, busy_drain[0][1], BACKLOG),
    )
    cpu = [cpu_used(quiet_drain, *window), cpu_used(busy_drain, *window)]
    names = ["worker", "Cassandra"][: len(cpu[0])]
    print(
        f"\ndrain of {BACKLOG:,} events, {JOB_REQUESTS} job and {LIST_REQUESTS} list requests "
        f"fired at {fired_at:,} applied, all answered at {answered_at:,}, jobs done at "
        f"{jobs_done_at:,}; answers {sorted(answers.items())}\n"
        f"  burst window (applied {window[0]:,} to {window[1]:,}): quiet {quiet_rate:,.0f}/s, "
        f"busy {busy_rate:,.0f}/s ({busy_rate / quiet_rate - 1:+.0%})\n"
        f"  whole drain: quiet {whole[0]:,.0f}/s, busy {whole[1]:,.0f}/s "
        f"({whole[1] / whole[0] - 1:+.0%})\n"
        "  CPU seconds in the window, quiet / busy: "
        + ", ".join(f"{n} {q:.2f} / {b:.2f}" for n, q, b in zip(names, *cpu, strict=True))
        + "\n  1-minute load average before the quiet run, before the busy run, after: "
        + ", ".join(f"{load:.1f}" for load in loads)
    )


async def burst(base: str) -> tuple[dict[int, int], list[int]]:
    """Fire the job and list requests at once; each must answer within a minute. Returns how
    many answered each status, and the ids of the jobs accepted."""
    async with httpx.AsyncClient(
        timeout=60, limits=httpx.Limits(max_connections=None, max_keepalive_connections=0)
    ) as client:
        job = {"table": "model", "strategy": "row_count"}
        requests = [
            client.post(f"{base}/reconciliation/jobs", json=job) for _ in range(JOB_REQUESTS)
        ]
        requests += [
            client.get(f"{base}/reconciliation/jobs?limit=50" if i % 2 else f"{base}/dlq?limit=100")
            for i in range(LIST_REQUESTS)
        ]
        responses = await asyncio.gather(*requests)
    answers: dict[int, int] = {}
    for response in responses:
        answers[response.status_code] = answers.get(response.status_code, 0) + 1
    jobs = [r.json()["id"] for r in responses if r.status_code == 202]
    return answers, jobs


async def test_an_api_request_that_gets_no_connection_in_time_answers_503(
    stack: Endpoints, unique: Unique
) -> None:
    """While every connection the API may use is stuck behind a lock, further API requests
    answer 503 with a clear error after a bounded wait (instead of queueing until the lock
    goes), /ready still answers from the worker's own connections, and once the lock goes the
    stuck requests answer too."""
    topic, schema = unique("cdc-events-busy-api"), unique.schema("busyapi")
    await create_topic(stack.kafka, topic)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema, http__host="127.0.0.1")
    worker = SinkApp(load_config(env))
    running = asyncio.create_task(worker.run())
    locker = await asyncpg.connect(stack.postgres_dsn)
    try:
        async with asyncio.timeout(60):
            while worker.probes is None or worker.http is None or not worker.worker.owned:
                assert not running.done()
                await asyncio.sleep(0.05)
        base = f"http://127.0.0.1:{worker.http.port}"
        probes = f"http://127.0.0.1:{worker.probes.port}"
        async with httpx.AsyncClient(
            timeout=60, limits=httpx.Limits(max_connections=None, max_keepalive_connections=0)
        ) as client:
            lock = locker.transaction()
            await lock.start()
            await locker.execute(f'LOCK TABLE "{schema}"._cdc_dlq_records IN ACCESS EXCLUSIVE MODE')
            listings = [asyncio.create_task(client.get(f"{base}/dlq")) for _ in range(6)]
            done, _ = await asyncio.wait(listings, timeout=20, return_when=asyncio.FIRST_COMPLETED)
            assert done, "no request answered while the API's connections were stuck"
            refused = [task.result() for task in done]
            assert {r.status_code for r in refused} == {503}
            assert "no PostgreSQL connection of the HTTP API" in refused[0].json()["error"]
            assert refused[0].headers["retry-after"] == "1"
            ready = await client.get(f"{probes}/ready")
            assert ready.status_code == 200, ready.text
            await lock.rollback()
            async with asyncio.timeout(30):
                statuses = [(await task).status_code for task in listings]
        assert statuses.count(200) >= 1
        assert set(statuses) <= {200, 503}
    finally:
        await locker.close()
        worker.stop()
        await asyncio.wait_for(running, 30)
