"""Retention: what the sink keeps beside the rows (dead letters, resolved reconciliation
mismatches, the audit log) is deleted once older than its setting, by housekeeping.

Each table is purged oldest first in transactions of CDC_GDPR__RETENTION_BATCH_ROWS rows, each
committed on its own, so a purge of a large backlog never holds locks or a snapshot for long
and the writer (another connection) keeps committing beside it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import asyncpg

from cdc_sink.config import GdprConfig
from cdc_sink.ops.metrics import Metrics


@dataclass(frozen=True)
class Retained:
    """A table housekeeping purges: the column that dates a row, which rows may go at all,
    and the setting that says how long they stay."""

    table: str
    dated_by: str
    eligible: str
    setting: str


RETAINED = (
    Retained("_cdc_dlq_records", "failed_at", "true", "dlq_retention_days"),
    Retained(
        table="_cdc_reconciliation_mismatches",
        dated_by="resolved_at",
        eligible="status <> 'open'",
        setting="mismatch_retention_days",
    ),
    Retained("_cdc_audit_log", "at", "true", "audit_retention_days"),
)


async def purge_expired(
    pool: asyncpg.Pool, settings: GdprConfig, metrics: Metrics, now: dt.datetime
) -> dict[str, int]:
    """Delete every row past its retention at `now`, batch by batch; return how many went
    per table (also counted in cdc_retention_purged_total). Raises asyncpg's errors (what was
    committed before stays purged)."""
    purged: dict[str, int] = {}
    for kept in RETAINED:
        horizon = now - dt.timedelta(days=getattr(settings, kept.setting))
        total = 0
        while True:
            status = await pool.execute(
                f"DELETE FROM {kept.table} WHERE id IN (SELECT id FROM {kept.table} "
                f"WHERE {kept.eligible} AND {kept.dated_by} < $1 "
                f"ORDER BY {kept.dated_by} LIMIT $2)",
                horizon,
                settings.retention_batch_rows,
            )
            count = int(status.split()[-1])
            total += count
            metrics.retention_purged.labels(kept.table).inc(count)
            if count < settings.retention_batch_rows:
                break
        purged[kept.table] = total
    return purged
