"""The reconciliation engine: runs one job end to end and repairs a job's mismatches.

A job runs under two guards: a session advisory lock on the job (held by a connection of its
own for as long as the job runs, released by PostgreSQL if the process dies) and the pending →
running claim. Either alone would do for a single job; together they also let
`mark_interrupted` tell a running job from an orphaned one. A job thus needs two connections
at once, the lock's and one for its statements: at most half the pool's connections hold a
lock at a time, so the statements of every job holding one always find a connection (more
jobs wait for their turn, pending, holding none).

Findings are confirmed before they are recorded: every differing key is read again on both
sides and kept only if it still differs, so a row the sink was applying while the scan passed
does not show as drift.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from cdc_recon.alerting import JobReport, ReconMetrics
from cdc_recon.canonical import Canon, epoch_micros, key_text
from cdc_recon.errors import (
    InvalidRequestError,
    ReconError,
    UnknownJobError,
    UnknownStrategyError,
)
from cdc_recon.pacing import Pacer
from cdc_recon.readers import CassandraReader, PgReader, ReconTable, native_key, written_key
from cdc_recon.repair import plan_repair
from cdc_recon.repository import Repository, job_lock
from cdc_recon.settings import ReconciliationConfig
from cdc_recon.strategies import (
    Finding,
    Kind,
    Outcome,
    RowSource,
    Strategy,
    checksum,
    compare_rows,
    row_count,
    sample,
    timestamp_range,
)
from cdc_recon.targets import find_target, resolve_table
from cdc_sink.apply.suppression import Suppression
from cdc_sink.apply.writer import Batch, PgWriter, json_key
from cdc_sink.config import PostgresConfig
from cdc_sink.errors import ConversionError
from cdc_sink.model.events import Mutation
from cdc_sink.model.masking import MaskingPolicy
from cdc_sink.ops.metrics import RECONCILIATION
from cdc_sink.ops.pools import BoundedPool, open_pool
from cdc_sink.ops.secrets import PostgresLogin

log = structlog.get_logger(__name__)
tracer = trace.get_tracer("cdc_recon")  # a no-op unless the process installed a provider

REPAIR_CHUNK = 500
NOT_CONVERGED = "repair did not converge: PostgreSQL keeps a newer timestamp or tombstone"
CONFIRM_CHUNK = 5000


def parse_strategy(name: str) -> Strategy:
    try:
        return Strategy(name)
    except ValueError:
        names = ", ".join(s.value for s in Strategy)
        raise UnknownStrategyError(f"unknown strategy {name!r}: use one of {names}") from None


def _instant(value: Any, option: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        stamp = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise InvalidRequestError(f"{option} {value!r} is not an ISO 8601 instant") from None
    return stamp.replace(tzinfo=dt.UTC) if stamp.tzinfo is None else stamp


@dataclass(frozen=True)
class RepairSummary:
    job_id: int
    repaired: int
    unresolved: int
    skipped: int
    erased: int = 0  # mismatches of erased keys dropped, and repair writes the writer skipped


class Reconciler:
    """Runs reconciliation jobs against one PostgreSQL pool (of at least two connections) and
    one Cassandra session."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        pg_schema: str,
        session: Any,
        settings: ReconciliationConfig,
        *,
        metrics: ReconMetrics,
        pushgateway_url: str | None,
        owner: str,
        suppression: Suppression | None = None,
        masking: MaskingPolicy | None = None,
    ) -> None:
        self.pool = pool
        # Erased keys (GDPR) are neither reported nor repaired.
        self.suppression = suppression or Suppression(None)
        self.masking = masking or MaskingPolicy()
        self.pg_schema = pg_schema
        self.session = session
        self.settings = settings
        self.metrics = metrics
        self.pushgateway_url = pushgateway_url
        self.owner = owner
        self.repository = Repository(pool, pg_schema)
        self.cassandra = CassandraReader(
            session,
            page_size=settings.page_size,
            concurrency=settings.concurrency,
            pacer=Pacer(settings.max_rows_per_second),
        )
        self.postgres = PgReader(
            pool, pg_schema, page_size=settings.page_size, pacer=Pacer(settings.max_rows_per_second)
        )
        self._lock_holders = asyncio.Semaphore(max(1, pool.get_max_size() // 2))
        self._running = asyncio.Semaphore(settings.max_running_jobs)

    async def resolve(self, name: str) -> ReconTable:
        return await resolve_table(self.pool, self.pg_schema, self.session, name, self.masking)

    @contextlib.asynccontextmanager
    async def holding(self, lock: int, *, wait: bool) -> AsyncIterator[asyncpg.Connection | None]:
        """A connection of the pool holding session advisory lock `lock` until the block ends:
        waiting for the lock if `wait`, else None at once if another session holds it. The
        block may use the pool besides (one connection at a time): at most half the pool holds
        a lock, so that never waits on another holder."""
        async with self._lock_holders, self.pool.acquire() as conn:
            if wait:
                await conn.execute("SELECT pg_advisory_lock($1)", lock)
            elif not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
                yield None
                return
            try:
                yield conn
            finally:
                with contextlib.suppress(Exception):
                    await conn.execute("SELECT pg_advisory_unlock($1)", lock)

    async def submit(
        self,
        table: str,
        strategy: str,
        options: Mapping[str, Any] | None = None,
        *,
        trigger: str = "manual",
        pool: asyncpg.Pool | BoundedPool | None = None,
    ) -> int:
        """Validate, find the table and record a pending job; return its id. `pool` is where
        that reads and writes (default: the reconciler's own). UnknownStrategyError,
        UnknownTableError or InvalidRequestError if it cannot run. Cassandra is not read: a
        job waiting for its turn costs it nothing (the job fails if Cassandra has no such
        table by the time it runs)."""
        chosen = parse_strategy(strategy)
        options = dict(options or {})
        if unknown := sorted(set(options) - {"window_start", "window_end", "sample_size", "seed"}):
            raise InvalidRequestError(f"unknown option(s): {', '.join(unknown)}")
        resolved = await find_target(pool or self.pool, self.pg_schema, table)
        start = _instant(options.pop("window_start", None), "window_start")
        end = _instant(options.pop("window_end", None), "window_end")
        if chosen is Strategy.TIMESTAMP_RANGE:
            now = dt.datetime.now(dt.UTC)
            end = end or now - dt.timedelta(seconds=self.settings.settle_seconds)
            start = start or end - dt.timedelta(seconds=self.settings.window_seconds)
            if start >= end:
                raise InvalidRequestError("window_start must be before window_end")
        elif start is not None or end is not None:
            raise InvalidRequestError("window_start/window_end apply to timestamp_range only")
        if chosen is Strategy.SAMPLE:
            size = options.setdefault("sample_size", self.settings.sample_size)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise InvalidRequestError("sample_size must be a whole number >= 1")
            options.setdefault("seed", time.time_ns() % 2**31)
        elif "sample_size" in options:
            raise InvalidRequestError("sample_size applies to the sample strategy only")
        repository = self.repository if pool is None else Repository(pool, self.pg_schema)
        return await repository.create_job(
            resolved.target, chosen.value, start, end, options, trigger
        )

    async def run(
        self,
        table: str,
        strategy: str,
        options: Mapping[str, Any] | None = None,
        *,
        trigger: str = "manual",
    ) -> dict[str, Any]:
        """Submit and execute a job here; return its final record."""
        job_id = await self.submit(table, strategy, options, trigger=trigger)
        await self.execute(job_id)
        job = await self.repository.job(job_id)
        assert job is not None
        return job

    async def execute(self, job_id: int) -> bool:
        """Run a pending job unless another runner has it; True if it ran here (whatever its
        outcome: failures are recorded on the job, not raised). Waits, holding nothing, while
        `max_running_jobs` jobs run here, so another pod may take the job meanwhile."""
        async with (
            self._running,
            self.holding(job_lock(self.pg_schema, job_id), wait=False) as locked,
        ):
            if locked is None or not await self.repository.claim(job_id, self.owner):
                return False
            await self._execute(job_id)
            return True

    async def _execute(self, job_id: int) -> None:
        job = await self.repository.job(job_id)
        assert job is not None
        table, strategy = job["target_table"], job["strategy"]
        attributes = {"cdc.job": job_id, "cdc.table": table, "cdc.strategy": strategy}
        with tracer.start_as_current_span("cdc.reconciliation", attributes=attributes) as span:
            await self._execute_job(job, span)

    async def _execute_job(self, job: Mapping[str, Any], span: trace.Span) -> None:
        job_id, table, strategy = job["id"], job["target_table"], job["strategy"]
        began = time.monotonic()
        log.info("reconciliation_started", job=job_id, table=table, strategy=strategy)
        outcome: Outcome | None = None
        try:
            outcome = await self._outcome(job)
        except asyncio.CancelledError:
            await asyncio.shield(
                self.repository.end(job_id, "interrupted", "the process stopped during the job")
            )
            self.metrics.jobs.labels(table, strategy, "interrupted").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - whatever went wrong ends the job as failed
            error = str(exc) if isinstance(exc, ReconError) else f"{type(exc).__name__}: {exc}"
            await self.repository.end(job_id, "failed", error)
            span.set_status(Status(StatusCode.ERROR, error))
            log.error("reconciliation_failed", job=job_id, table=table, error=error)
        else:
            await self.repository.finish(job_id, table, outcome)
            span.set_attributes(
                {"cdc.mismatches": outcome.mismatch_count, "cdc.drift": outcome.drift_percentage}
            )
            log.info(
                "reconciliation_finished",
                job=job_id,
                table=table,
                strategy=strategy,
                mismatches=outcome.mismatch_count,
                drift=outcome.drift_percentage,
            )
        report = JobReport(
            table,
            strategy,
            "failed" if outcome is None else "succeeded",
            time.time(),
            time.monotonic() - began,
            None if outcome is None else outcome.drift_percentage,
            None if outcome is None else outcome.mismatch_count,
        )
        self.metrics.record(report)
        await self.metrics.push(self.pushgateway_url, report, self.settings.push_timeout_seconds)

    async def _outcome(self, job: Mapping[str, Any]) -> Outcome:
        table = await self.resolve(job["target_table"])
        strategy = parse_strategy(job["strategy"])
        options = job["options"] or {}
        c: RowSource = self.cassandra
        p: RowSource = self.postgres
        stamped: Sequence[str] = ()
        if strategy is Strategy.ROW_COUNT:
            return await row_count(table, c, p)
        if strategy is Strategy.CHECKSUM:
            outcome = await checksum(table, c, p, buckets=self.settings.buckets)
        elif strategy is Strategy.TIMESTAMP_RANGE:
            stamped = table.single_cell_columns
            outcome = await timestamp_range(
                table,
                c,
                p,
                start_us=epoch_micros(job["window_start"]),
                end_us=epoch_micros(job["window_end"]),
            )
        else:
            outcome = await sample(
                table, c, p, size=int(options["sample_size"]), seed=int(options["seed"])
            )
        found = len(outcome.findings)
        outcome.findings = await self.confirm(table, outcome.findings, stamped)
        outcome.details["unconfirmed"] = found - len(outcome.findings)
        if table.cassandra_only:
            outcome.details["cassandra_only_columns"] = list(table.cassandra_only)
        return outcome

    async def confirm(
        self, table: ReconTable, findings: Sequence[Finding], stamped: Sequence[str] = ()
    ) -> list[Finding]:
        """The findings whose keys still differ when read again on both sides, but for erased
        keys (counted in cdc_erasure_suppressed_total)."""
        found = await self.differing(table, [f.key for f in findings], stamped)
        if not found:
            return found
        erased = await self._erased(table, [f.key for f in found])
        if erased:
            self._count_erased(table, len(erased))
            log.info(
                "reconciliation_erased_findings_dropped", table=table.target, count=len(erased)
            )
        return [f for f in found if f.key not in erased]

    def _count_erased(self, table: ReconTable, count: int) -> None:
        self.metrics.erasure_suppressed.labels(table.target, RECONCILIATION).inc(count)

    async def differing(
        self, table: ReconTable, keys: Sequence[tuple[Canon, ...]], stamped: Sequence[str] = ()
    ) -> list[Finding]:
        """What differs between the two sides for these keys, read now."""
        found: list[Finding] = []
        for start in range(0, len(keys), CONFIRM_CHUNK):
            chunk = keys[start : start + CONFIRM_CHUNK]
            c_rows, p_rows = await asyncio.gather(
                self.cassandra.fetch(table, chunk, writetimes=bool(stamped)),
                self.postgres.fetch(table, chunk, writetimes=bool(stamped)),
            )
            found += compare_rows(table.value_columns, c_rows, p_rows, writetime_columns=stamped)
        return found

    async def _erased(
        self, table: ReconTable, keys: Sequence[tuple[Canon, ...]]
    ) -> set[tuple[Canon, ...]]:
        """Those of `keys` erased for GDPR (compared by the writer's rendering of their values;
        see `written_key`)."""
        natives = {written_key(table, key): key for key in keys}
        async with self.pool.acquire() as conn:
            gone = await self.suppression.erased(
                conn, table.target, list(natives), json_key, table.partition_columns
            )
        return {natives[n] for n in gone}

    async def repair(self, job_id: int) -> RepairSummary:
        """Repair every open mismatch of a job; record each one's resolution."""
        job = await self.repository.job(job_id)
        if job is None:
            raise UnknownJobError(f"no reconciliation job {job_id}")
        if job["status"] != "succeeded":
            raise InvalidRequestError(
                f"job {job_id} is {job['status']}: "
                "only the mismatches of a succeeded job can be repaired"
            )
        table = await self.resolve(job["target_table"])
        mismatches = await self.repository.mismatches(job=job_id, status="open", limit=10**9)
        repaired = unresolved = skipped = erased = 0
        for start in range(0, len(mismatches), REPAIR_CHUNK):
            chunk = mismatches[start : start + REPAIR_CHUNK]
            done, left, passed, gone = await self._repair_chunk(table, chunk)
            repaired, unresolved, skipped = repaired + done, unresolved + left, skipped + passed
            erased += gone
        log.info(
            "reconciliation_repaired",
            job=job_id,
            repaired=repaired,
            unresolved=unresolved,
            erased=erased,
        )
        return RepairSummary(job_id, repaired, unresolved, skipped, erased)

    async def _repair_chunk(
        self, table: ReconTable, chunk: Sequence[Mapping[str, Any]]
    ) -> tuple[int, int, int, int]:
        """Repair a chunk of mismatches; return how many were repaired, did not converge,
        could not be repaired, and were left out or skipped because their key was erased."""
        keys: list[tuple[Canon, ...]] = [tuple(m["row_key"]) for m in chunk]
        natives, stamps = await asyncio.gather(
            self.cassandra.fetch_native(table, keys), self.postgres.fetch_stamps(table, keys)
        )
        schema = table.sink_schema()
        now_us = time.time_ns() // 1000
        mutations: list[Mutation] = []
        planned: list[tuple[int, str, str]] = []  # (mismatch id, key text, resolution)
        skipped: list[tuple[int, str, str]] = []  # (mismatch id, status, resolution)
        # Found before their key was erased: neither written back nor kept (they name the key).
        erased = await self._erased(table, keys)
        forgotten = [m["id"] for m, key in zip(chunk, keys, strict=True) if key in erased]
        if forgotten:
            await self.repository.forget(forgotten)
            log.info(
                "reconciliation_erased_mismatches_dropped",
                table=table.target,
                count=len(forgotten),
            )
        gone = len(forgotten)
        for mismatch, key in zip(chunk, keys, strict=True):
            if key in erased:
                continue
            text = key_text(key)
            action = plan_repair(
                table,
                Kind(mismatch["kind"]),
                native_key(table, key),
                mismatch["columns"],
                natives.get(text),
                stamps.get(text),
                now_us,
            )
            try:
                mutations += [schema.to_mutation(e) for e in action.events]
            except ConversionError as exc:
                skipped.append((mismatch["id"], "open", f"cannot repair: {exc}"))
                continue
            planned.append((mismatch["id"], text, action.resolution))
        if mutations:
            async with self.pool.acquire() as conn:
                writer = PgWriter(conn, self.pg_schema, "cdc-reconciliation", self.suppression)
                result = await writer.apply(Batch(tables=[(schema, mutations)]))
            # Keys erased since the look-up above: the writer skipped their events.
            gone += sum(result.suppressed.values())
        if gone:
            self._count_erased(table, gone)
        # Verify: a repair counts only if the row now matches.
        still = {key_text(f.key) for f in await self.differing(table, keys)}
        verified = [
            (mismatch_id, "open", NOT_CONVERGED)
            if text in still
            else (mismatch_id, "resolved", resolution)
            for mismatch_id, text, resolution in planned
        ]
        await self.repository.resolve_many(skipped + verified)
        repaired = sum(status == "resolved" for _, status, _ in verified)
        return repaired, len(verified) - repaired, len(skipped), gone


async def recon_pool(postgres: PostgresConfig, login: PostgresLogin) -> asyncpg.Pool:
    """Connections of reconciliation's own (a long scan never takes the sink's), as many as
    CDC_POSTGRES__RECONCILIATION_POOL_SIZE."""
    return await open_pool(
        postgres, login, size=postgres.reconciliation_pool_size, application_name="cdc-recon"
    )
