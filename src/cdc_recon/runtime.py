"""The runtime the sink process hosts: a Reconciler made on first use (lazy Cassandra session
and pool), the scheduler task when enabled, and background runs of manual triggers."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter

from cdc_recon.alerting import ReconMetrics
from cdc_recon.readers import connect_cassandra
from cdc_recon.scheduler import Scheduler
from cdc_recon.service import Reconciler, recon_pool
from cdc_recon.settings import reconciliation_settings
from cdc_sink.apply.suppression import Suppression
from cdc_sink.config import Config
from cdc_sink.model.masking import masking_policy
from cdc_sink.ops.pools import BoundedPool
from cdc_sink.ops.secrets import PostgresLogin


class ReconciliationRuntime:
    """Reconciliation inside the sink process: a Reconciler made on first use (it needs
    Cassandra, and opens its own PostgreSQL pool), the scheduler loop when enabled, and
    background runs of manual triggers. `pool` (the HTTP API's) serves the routes: listings,
    and recording the jobs they create."""

    def __init__(
        self,
        config: Config,
        pool: asyncpg.Pool | BoundedPool,
        registry: CollectorRegistry,
        owner: str,
        login: PostgresLogin | None = None,
        erasure_suppressed: Counter | None = None,
    ) -> None:
        """`erasure_suppressed`: the worker's counter on `registry`, which reconciliation's
        skipped erased keys add to."""
        self.config = config
        self.settings = reconciliation_settings(config)
        self.pool = pool
        self.login = login or PostgresLogin(config)
        self.metrics = ReconMetrics(registry, erasure_suppressed)
        self.owner = owner
        self._reconciler: Reconciler | None = None
        self._session: Any = None
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def reconciler(self) -> Reconciler:
        """The engine (connects to Cassandra the first time; ReconError if it cannot)."""
        async with self._lock:
            if self._reconciler is None:
                self._session = await asyncio.to_thread(
                    connect_cassandra, self.config.cassandra, self.settings.consistency
                )
                # Jobs get connections of their own, so a long scan never starves the sink.
                self._pool = await recon_pool(self.config.postgres, self.login)
                self._reconciler = Reconciler(
                    self._pool,
                    self.config.postgres.schema,
                    self._session,
                    self.settings,
                    metrics=self.metrics,
                    pushgateway_url=self.config.pushgateway.url,
                    owner=self.owner,
                    suppression=Suppression(self.config.gdpr.hash_key),
                    masking=masking_policy(self.config.masking),
                )
            return self._reconciler

    def start(self) -> None:
        """Start the scheduler loop if CDC_RECONCILIATION__ENABLED."""
        if self.settings.enabled:
            scheduler = Scheduler(self.reconciler, self.settings)
            self.spawn(scheduler.run_forever())

    def spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._session is not None:
            await asyncio.to_thread(self._session.cluster.shutdown)
            self._session = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
