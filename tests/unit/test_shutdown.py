"""Shutdown is bounded: a stop request ends the worker within its timeout, whatever it does."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from cdc_sink.cli import supervise
from cdc_sink.config import ConfigError, load_config
from cdc_sink.consumer.worker import Worker
from cdc_sink.retry import Stopping


async def test_a_worker_that_finishes_gives_its_own_exit_code() -> None:
    """Without a stop request the worker's own result is the exit code."""
    requested = asyncio.Event()

    async def work() -> int:
        await asyncio.sleep(0.01)
        return 3

    assert await supervise(asyncio.ensure_future(work()), requested, 5) == 3


async def test_a_worker_that_stops_when_asked_exits_0_at_once() -> None:
    """A stop request the worker honours ends it with 0, long before the timeout."""
    requested = asyncio.Event()

    async def work() -> int:
        await requested.wait()
        await asyncio.sleep(0.05)  # finishes its batch
        return 0

    running = asyncio.ensure_future(work())
    asyncio.get_running_loop().call_later(0.05, requested.set)
    began = time.monotonic()
    assert await supervise(running, requested, 5) == 0
    assert time.monotonic() - began < 1


async def test_a_worker_that_ignores_the_stop_is_cancelled_before_the_timeout() -> None:
    """A worker stuck in its batch is cancelled (the batch abandoned) and the exit code is 0,
    within the timeout."""
    requested = asyncio.Event()
    cleaned_up = asyncio.Event()

    async def stuck() -> int:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned_up.set()  # e.g. leaving the group
        return 5

    running = asyncio.ensure_future(stuck())
    requested.set()
    began = time.monotonic()
    assert await supervise(running, requested, 0.6) == 0
    assert time.monotonic() - began < 0.6
    assert running.cancelled()
    assert cleaned_up.is_set()


async def test_a_worker_that_ignores_cancellation_returns_1_at_the_deadline() -> None:
    """If even cancellation does not end the worker, supervise gives up at the deadline
    with 1 (the caller then exits the process) instead of waiting for ever."""
    requested = asyncio.Event()
    release = asyncio.Event()

    async def stubborn() -> int:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()
        return 0

    running = asyncio.ensure_future(stubborn())
    requested.set()
    began = time.monotonic()
    assert await supervise(running, requested, 0.6) == 1
    assert 0.5 < time.monotonic() - began < 1.0
    assert not running.done()
    release.set()
    await running


async def test_a_stop_during_a_retry_backoff_interrupts_it() -> None:
    """The worker's backoff wait ends as soon as a stop is requested (it does not wait out a
    delay of up to a minute), raising Stopping so the batch is abandoned uncommitted."""
    settings = {"CDC_SINK__RETRY_BASE_SECONDS": "60", "CDC_SINK__RETRY_MAX_SECONDS": "60"}
    worker = Worker(load_config(settings))
    worker.retry.rng.seed(1)  # a first delay of many seconds

    async def unreachable() -> None:
        raise ConnectionRefusedError

    asyncio.get_running_loop().call_later(0.05, worker.stop)
    began = time.monotonic()
    with pytest.raises(Stopping):
        await worker.retry.run(
            "write", unreachable, stopping=worker.stopping, metrics=worker.metrics
        )
    assert time.monotonic() - began < 1


def test_shutdown_timeout_is_a_validated_setting() -> None:
    """CDC_SINK__SHUTDOWN_TIMEOUT_SECONDS defaults to 30 and must be positive."""
    assert load_config({}).sink.shutdown_timeout_seconds == 30.0
    assert (
        load_config({"CDC_SINK__SHUTDOWN_TIMEOUT_SECONDS": "5"}).sink.shutdown_timeout_seconds == 5
    )
    with pytest.raises(ConfigError, match="CDC_SINK__SHUTDOWN_TIMEOUT_SECONDS"):
        load_config({"CDC_SINK__SHUTDOWN_TIMEOUT_SECONDS": "0"})
