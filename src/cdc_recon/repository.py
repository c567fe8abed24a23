"""Repository: reconciliation jobs and mismatches in PostgreSQL (the only SQL of cdc_recon
besides the readers).

A job moves pending → running → succeeded | failed | interrupted. `claim` is the one step from
pending to running: a conditional UPDATE, so of several callers exactly one wins. While a job
runs, its runner holds a session advisory lock on `job_lock(schema, id)`; a running job whose
lock is free has lost its runner (the process died or restarted) and `mark_interrupted` says
so.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from cdc_recon.canonical import key_text
from cdc_recon.strategies import Outcome
from cdc_sink.ops.pools import BoundedPool
from cdc_sink.schema.tables import lock_id

JOB_COLUMNS = (
    "id, target_table, strategy, window_start, window_end, status, cassandra_rows, "
    "postgres_rows, mismatches, drift_percentage, started_at, finished_at, error, created_at, "
    "options, details, trigger, owner"
)
MISMATCH_COLUMNS = (
    "id, job_id, target_table, row_key, kind, columns, status, resolution, created_at, "
    "resolved_at, details"
)


def job_lock(schema: str, job_id: int) -> int:
    """The advisory lock a job's runner holds while the job runs. Advisory locks are per
    database: the schema keeps the jobs of different schemas (own id sequences) apart."""
    return lock_id("cdc_recon_job", schema, str(job_id))


def schedule_lock(schema: str, table: str, strategy: str) -> int:
    """The advisory lock under which a scheduler decides whether (table, strategy) is due."""
    return lock_id("cdc_recon_schedule", schema, table, strategy)


def _record(row: asyncpg.Record) -> dict[str, Any]:
    out = dict(row)
    for name in ("options", "details", "row_key"):
        if isinstance(out.get(name), str):
            out[name] = json.loads(out[name])
    if "columns" in out:
        out["columns"] = list(out["columns"])
    return out


class Repository:
    """Jobs and mismatches; every method is one short transaction on the pool."""

    def __init__(self, pool: asyncpg.Pool | BoundedPool, schema: str) -> None:
        self.pool = pool
        self.schema = schema

    async def create_job(
        self,
        table: str,
        strategy: str,
        window_start: dt.datetime | None = None,
        window_end: dt.datetime | None = None,
        options: dict[str, Any] | None = None,
        trigger: str = "manual",
    ) -> int:
        """Record a pending job on a resolved target table."""
        job_id = await self.pool.fetchval(
            "INSERT INTO _cdc_reconciliation_jobs (target_table, strategy, window_start, "
            "window_end, options, trigger) VALUES ($1, $2, $3, $4, $5::jsonb, $6) RETURNING id",
            table,
            strategy,
            window_start,
            window_end,
            json.dumps(options or {}),
            trigger,
        )
        return int(job_id)

    async def claim(self, job_id: int, owner: str) -> bool:
        """pending → running; True for exactly one caller."""
        status = await self.pool.execute(
            "UPDATE _cdc_reconciliation_jobs SET status = 'running', started_at = now(), "
            "owner = $2 WHERE id = $1 AND status = 'pending'",
            job_id,
            owner,
        )
        return bool(status == "UPDATE 1")

    async def finish(self, job_id: int, table: str, outcome: Outcome) -> None:
        """Record a succeeded job and its findings, atomically."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE _cdc_reconciliation_jobs SET status = 'succeeded', cassandra_rows = $2, "
                "postgres_rows = $3, mismatches = $4, drift_percentage = $5, details = $6::jsonb, "
                "finished_at = now() WHERE id = $1",
                job_id,
                outcome.cassandra_rows,
                outcome.postgres_rows,
                outcome.mismatch_count,
                outcome.drift_percentage,
                json.dumps(outcome.details, default=str),
            )
            if outcome.findings:
                await conn.copy_records_to_table(
                    "_cdc_reconciliation_mismatches",
                    records=[
                        (job_id, table, key_text(f.key), f.kind.value, list(f.columns))
                        for f in outcome.findings
                    ],
                    columns=["job_id", "target_table", "row_key", "kind", "columns"],
                )

    async def end(self, job_id: int, status: str, error: str) -> None:
        """Record a failed or interrupted job (only if it has not ended otherwise already)."""
        assert status in ("failed", "interrupted")
        await self.pool.execute(
            "UPDATE _cdc_reconciliation_jobs SET status = $2, error = $3, finished_at = now() "
            "WHERE id = $1 AND status IN ('pending', 'running')",
            job_id,
            status,
            error,
        )

    async def mark_interrupted(self) -> list[int]:
        """Running jobs whose runner is gone (their lock is free) become 'interrupted'."""
        interrupted = []
        async with self.pool.acquire() as conn:
            for row in await conn.fetch(
                "SELECT id FROM _cdc_reconciliation_jobs WHERE status = 'running'"
            ):
                lock = job_lock(self.schema, row["id"])
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
                    try:
                        status = await conn.execute(
                            "UPDATE _cdc_reconciliation_jobs SET status = 'interrupted', "
                            "finished_at = now(), error = 'the process running it stopped "
                            "before the job ended' WHERE id = $1 AND status = 'running'",
                            row["id"],
                        )
                        if status == "UPDATE 1":
                            interrupted.append(row["id"])
                    finally:
                        await conn.execute("SELECT pg_advisory_unlock($1)", lock)
        return interrupted

    async def job(self, job_id: int) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            f"SELECT {JOB_COLUMNS} FROM _cdc_reconciliation_jobs WHERE id = $1", job_id
        )
        return None if row is None else _record(row)

    async def jobs(
        self,
        *,
        table: str | None = None,
        strategy: str | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            f"SELECT {JOB_COLUMNS} FROM _cdc_reconciliation_jobs "
            "WHERE ($1::text IS NULL OR target_table = $1) AND ($2::text IS NULL OR strategy = $2) "
            "AND ($3::text IS NULL OR status = $3) ORDER BY id DESC LIMIT $4",
            table,
            strategy,
            status,
            limit,
        )
        return list(map(_record, rows))

    async def pending_jobs(self) -> list[int]:
        rows = await self.pool.fetch(
            "SELECT id FROM _cdc_reconciliation_jobs WHERE status = 'pending' ORDER BY id"
        )
        return [r["id"] for r in rows]

    async def last_created(
        self, conn: asyncpg.Connection, table: str, strategy: str
    ) -> dt.datetime | None:
        value = await conn.fetchval(
            "SELECT max(created_at) FROM _cdc_reconciliation_jobs "
            "WHERE target_table = $1 AND strategy = $2 AND trigger = 'schedule'",
            table,
            strategy,
        )
        return value if isinstance(value, dt.datetime) else None

    async def mismatches(
        self,
        *,
        job: int | None = None,
        table: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            f"SELECT {MISMATCH_COLUMNS} FROM _cdc_reconciliation_mismatches "
            "WHERE ($1::bigint IS NULL OR job_id = $1) AND ($2::text IS NULL OR target_table = $2) "
            "AND ($3::text IS NULL OR kind = $3) AND ($4::text IS NULL OR status = $4) "
            "ORDER BY id LIMIT $5",
            job,
            table,
            kind,
            status,
            limit,
        )
        return list(map(_record, rows))

    async def resolve_many(self, outcomes: Sequence[tuple[int, str, str]]) -> None:
        """Record (mismatch id, status, resolution) for many mismatches in one statement."""
        if not outcomes:
            return
        await self.pool.execute(
            "UPDATE _cdc_reconciliation_mismatches m SET status = o.status, "
            "resolution = o.resolution, resolved_at = now() "
            "FROM unnest($1::bigint[], $2::text[], $3::text[]) AS o(id, status, resolution) "
            "WHERE m.id = o.id",
            [mismatch_id for mismatch_id, _, _ in outcomes],
            [status for _, status, _ in outcomes],
            [resolution for _, _, resolution in outcomes],
        )

    async def forget(self, mismatch_ids: Sequence[int]) -> None:
        """Delete these mismatches (their key was erased)."""
        await self.pool.execute(
            "DELETE FROM _cdc_reconciliation_mismatches WHERE id = ANY($1::bigint[])",
            list(mismatch_ids),
        )

    async def resolve(
        self, mismatch_id: int, resolution: str, status: str = "resolved"
    ) -> dict[str, Any] | None:
        """Record how a mismatch was settled; None if there is no such mismatch."""
        row = await self.pool.fetchrow(
            "UPDATE _cdc_reconciliation_mismatches SET status = $2, resolution = $3, "
            f"resolved_at = now() WHERE id = $1 RETURNING {MISMATCH_COLUMNS}",
            mismatch_id,
            status,
            resolution,
        )
        return None if row is None else _record(row)
