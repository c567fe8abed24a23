"""Pacing of reconciliation's reads: a budget of rows per second, so a scan yields to the
pipeline that shares its Cassandra and PostgreSQL instead of reading as fast as they answer.

A read says how many rows it cost only once it returns (a page, a count), so reads are charged
afterwards: a charge may overdraw the budget, and the reader then waits until the budget is
paid back before its next read. Over any stretch longer than a second, the rows read average
at most the budget.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field


@dataclass
class RowBudget:
    """A token bucket of `rate` rows per second, holding at most one second's worth (so an idle
    spell does not bank a burst). Pure: time is passed in. `rate` 0 means unlimited."""

    rate: float
    tokens: float = field(init=False, default=0.0)
    updated: float | None = field(init=False, default=None)

    def charge(self, rows: int, now: float) -> float:
        """Charge `rows` read at `now`; return the seconds to wait before the next read."""
        if self.rate <= 0:
            return 0.0
        if self.updated is None:
            self.tokens = self.rate
        else:
            self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= rows
        return max(0.0, -self.tokens / self.rate)


class Pacer:
    """A RowBudget shared by the threads and tasks of one reader (thread-safe); `waited` is the
    time it has held readers back, in seconds summed over the readers."""

    def __init__(self, rows_per_second: float) -> None:
        self._budget = RowBudget(rows_per_second)
        self._lock = threading.Lock()
        self.waited = 0.0

    def _charge(self, rows: int) -> float:
        with self._lock:
            delay = self._budget.charge(rows, time.monotonic())
            self.waited += delay
            return delay

    def pace(self, rows: int) -> None:
        """Charge `rows` and block until the budget allows the next read (in a thread)."""
        if delay := self._charge(rows):
            time.sleep(delay)

    async def pace_async(self, rows: int) -> None:
        """Charge `rows` and sleep until the budget allows the next read (in the event loop)."""
        if delay := self._charge(rows):
            await asyncio.sleep(delay)
