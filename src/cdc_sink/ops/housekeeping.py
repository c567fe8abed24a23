"""Housekeeping beside the stream: expiring TTL'd rows and pruning old tombstones."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from cdc_sink.apply.writer import PgWriter
from cdc_sink.config import Config
from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.metrics import Metrics
from cdc_sink.schema.catalog import Catalog

log = get_logger("cdc_sink.runner")


async def housekeeping(
    pool: asyncpg.Pool, catalog: Catalog, config: Config, metrics: Metrics
) -> None:
    """Until cancelled: expire TTL'd rows when due and prune tombstones past their grace
    period. A failed round is counted and logged; the next one tries again."""
    sink = config.sink
    last_prune = 0.0
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
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            metrics.errors.labels("housekeeping", "transient").inc()
            log.warning("housekeeping_failed", error=f"{type(exc).__name__}: {exc}")
