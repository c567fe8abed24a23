"""Housekeeping beside the stream: expiring TTL'd rows, pruning old tombstones, and purging
what is past its retention (retention.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import asyncpg

from cdc_sink.apply.writer import PgWriter
from cdc_sink.config import Config
from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.metrics import Metrics
from cdc_sink.ops.retention import purge_expired
from cdc_sink.schema.catalog import Catalog

log = get_logger("cdc_sink.runner")


async def housekeeping(
    pool: asyncpg.Pool, catalog: Catalog, config: Config, metrics: Metrics
) -> None:
    """Until cancelled: expire TTL'd rows when due and prune tombstones past their grace
    period, and purge what is past its retention every CDC_GDPR__RETENTION_INTERVAL_SECONDS.
    A failed round is counted and logged; the next one tries again."""
    sink = config.sink
    last_prune = last_purge = 0.0
    while True:
        await asyncio.sleep(sink.expiry_interval_seconds)
        try:
            async with pool.acquire() as conn:
                writer = PgWriter(conn, config.postgres.schema, config.kafka.group_id)
                for schema in list(catalog.tables()):
                    while await writer.expire_due(schema) >= 1000:
                        pass
                if time.monotonic() - last_prune > 60:
                    pruned = await writer.prune_tombstones(sink.tombstone_grace_seconds)
                    last_prune = time.monotonic()
                    if pruned:
                        log.info("tombstones_pruned", count=pruned)
            if time.monotonic() - last_purge > config.gdpr.retention_interval_seconds:
                purged = await purge_expired(pool, config.gdpr, metrics, dt.datetime.now(dt.UTC))
                last_purge = time.monotonic()
                if any(purged.values()):
                    log.info("retention_purged", **purged)
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            metrics.errors.labels("housekeeping", "transient").inc()
            log.warning("housekeeping_failed", error=f"{type(exc).__name__}: {exc}")
