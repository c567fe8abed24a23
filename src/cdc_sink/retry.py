"""The one retry policy: how many attempts, how long between them, what is worth retrying."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from cdc_sink.errors import FatalError
from cdc_sink.failures import Kind, classify
from cdc_sink.ops.logs import get_logger

if TYPE_CHECKING:
    from cdc_sink.config import SinkConfig
    from cdc_sink.ops.metrics import Metrics

log = get_logger("cdc_sink.runner")

T = TypeVar("T")


class Stopping(Exception):
    """Shutdown was requested while a step waited to retry: abandon it, commit nothing."""


def backoff_delay(
    attempt: int, base: float, cap: float, rng: random.Random, growth: float = 2.0
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * growth**attempt)]."""
    return rng.uniform(0, min(cap, base * (growth**attempt)))


@dataclass
class RetryPolicy:
    """Exponential backoff from `base_s` up to `cap_s` (each bound `growth` times the last), at
    most `attempts` tries (0: until cancelled); with `jitter`, each wait is drawn uniformly
    below that bound."""

    attempts: int
    base_s: float
    cap_s: float
    jitter: bool = True
    growth: float = 2.0
    rng: random.Random = field(default_factory=random.Random)  # jitter, not security

    @classmethod
    def of(cls, sink: SinkConfig) -> RetryPolicy:
        """The policy CDC_SINK__RETRY_* configure (write, decode, DLQ, claims)."""
        return cls(sink.retry_attempts, sink.retry_base_seconds, sink.retry_max_seconds)

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (counted from 0)."""
        if self.jitter:
            return backoff_delay(attempt, self.base_s, self.cap_s, self.rng, self.growth)
        return float(min(self.cap_s, self.base_s * self.growth**attempt))

    def gives_up(self, failures: int) -> bool:
        """Whether `failures` failed attempts are all the policy allows."""
        return 0 < self.attempts <= failures

    async def run(
        self,
        stage: str,
        step: Callable[[], Awaitable[T]],
        *,
        stopping: asyncio.Event,
        metrics: Metrics,
        on_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """Run `step`; retry transient failures (failures.classify), counting each retry in
        cdc_retries_total{stage}. Raises FatalError after the last attempt (nothing committed),
        Stopping if `stopping` is set while waiting, and anything not transient as it is."""
        attempt = 0
        while True:
            try:
                return await step()
            except Exception as exc:
                if classify(exc) is not Kind.TRANSIENT:
                    raise
                if self.gives_up(attempt + 1):
                    raise FatalError(
                        f"{stage}: gave up after {self.attempts} attempts ({type(exc).__name__}: "
                        f"{exc}); nothing was committed, the batch will be re-read on restart",
                        stage=stage,
                    ) from exc
                delay = self.delay(attempt)
                attempt += 1
                metrics.retries.labels(stage).inc()
                metrics.errors.labels(stage, "transient").inc()
                log.warning(
                    f"{stage}_retry",
                    attempt=attempt,
                    delay_s=round(delay, 3),
                    error=f"{type(exc).__name__}: {exc}",
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                if stopping.is_set():
                    raise Stopping(f"shutdown requested while retrying {stage}") from exc
                if on_retry is not None:
                    try:
                        await on_retry()
                    except Exception as again:  # noqa: BLE001 - the next attempt reports it
                        log.warning(f"{stage}_reconnect_failed", error=str(again))
