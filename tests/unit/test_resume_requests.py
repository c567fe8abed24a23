"""ResumeRequests.follow: the loop through which a pod acts on resumes other pods received."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from structlog.testing import capture_logs

from cdc_sink.dlq.replay import ResumeRequests


class Requests:
    """`_cdc_resume_requests` as the follower reads it: max(id), then rows after an id; the
    reads listed in `failures` raise OSError (PostgreSQL away)."""

    def __init__(self, rows: list[dict[str, Any]], failures: set[int]) -> None:
        self.rows, self.failures, self.reads = rows, failures, 0

    def _read(self) -> None:
        self.reads += 1
        if self.reads in self.failures:
            raise OSError("connection refused")

    async def fetchval(self, query: str) -> int:
        self._read()
        return 1  # requests up to id 1 came before this pod looked

    async def fetch(self, query: str, after: int) -> list[dict[str, Any]]:
        self._read()
        return [row for row in self.rows if row["id"] > after]


async def test_other_pods_requests_are_acted_on_once_and_a_failed_look_is_retried() -> None:
    """Requests after the first look are acted on once each, in order, except those this
    pod made itself (it acted on them when made); a failed read is logged and the loop goes
    on to read them at its next turn."""
    requests = ResumeRequests()
    requests._own.add(3)
    rows = [
        {"id": 1, "topic": "old", "partition": None},
        {"id": 2, "topic": "t", "partition": 4},
        {"id": 3, "topic": "mine", "partition": None},
        {"id": 4, "topic": None, "partition": None},
    ]
    table = Requests(rows, failures={1, 3})
    resumed: list[tuple[str | None, int | None]] = []

    async def resume(topic: str | None, partition: int | None) -> list[Any]:
        resumed.append((topic, partition))
        return []

    with capture_logs() as logs:
        follower = asyncio.create_task(requests.follow(table, resume, 0.01))  # type: ignore[arg-type]
        async with asyncio.timeout(5):
            while table.reads < 8:
                await asyncio.sleep(0.01)
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    assert resumed == [("t", 4), (None, None)]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "resume_requests_unread"
    ] * 2
