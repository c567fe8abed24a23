"""Scheduler: the asyncio loop that runs reconciliation jobs inside the sink process.

Every `poll_seconds` a tick
1. marks running jobs whose runner is gone as 'interrupted' (repository.mark_interrupted);
2. runs pending jobs (manual triggers recorded by any pod): the claim lets one pod run each;
3. for every scheduled (table, strategy): under a session advisory lock on the pair, creates a
   job if the last scheduled one is older than its interval, then runs it. A pod that waits
   for the lock finds that job afterwards and creates none, so a due job is created once and
   run once however many pods tick together.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable

import structlog

from cdc_recon.errors import ReconError
from cdc_recon.repository import schedule_lock
from cdc_recon.service import Reconciler
from cdc_recon.settings import ReconciliationConfig

log = structlog.get_logger(__name__)


class Scheduler:
    """Runs the configured schedule and the pending jobs with the Reconciler that `reconciler`
    gives (the runtime's, made on first use)."""

    def __init__(
        self, reconciler: Callable[[], Awaitable[Reconciler]], settings: ReconciliationConfig
    ) -> None:
        self.reconciler = reconciler
        self.settings = settings
        self.entries = settings.schedule_entries()
        self._targets: dict[str, str] = {}

    async def run_forever(self) -> None:
        """Tick until cancelled; a failed tick is logged and the next one tries again."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad tick
                log.warning("reconciliation_tick_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.settings.poll_seconds)

    async def tick(self, now: dt.datetime | None = None) -> list[int]:
        """One round; returns the ids of the jobs this scheduler ran."""
        reconciler = await self.reconciler()
        repository = reconciler.repository
        interrupted = await repository.mark_interrupted()
        if interrupted:
            log.warning("reconciliation_jobs_interrupted", jobs=interrupted)
        ran = [job for job in await repository.pending_jobs() if await reconciler.execute(job)]
        for name, strategy, interval in self.entries:
            try:
                job = await self._create_if_due(name, strategy, interval, now)
            except ReconError as exc:
                log.warning("reconciliation_schedule_skipped", table=name, error=str(exc))
                continue
            if job is not None and await reconciler.execute(job):
                ran.append(job)
        return ran

    async def _create_if_due(
        self, name: str, strategy: str, interval: int, now: dt.datetime | None
    ) -> int | None:
        reconciler = await self.reconciler()
        target = self._targets.get(name)
        if target is None:
            target = self._targets[name] = (await reconciler.resolve(name)).target
        lock = schedule_lock(reconciler.pg_schema, target, strategy)
        async with reconciler.holding(lock, wait=True) as conn:
            assert conn is not None  # waited for the lock
            last = await reconciler.repository.last_created(conn, target, strategy)
            moment = now or dt.datetime.now(dt.UTC)
            if last is not None and moment - last < dt.timedelta(seconds=interval):
                return None
            return await reconciler.submit(target, strategy, trigger="schedule")
