"""The offset mirror: Kafka's copy of the offsets PostgreSQL committed, for lag tooling only."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from cdc_sink.apply.writer import CheckpointMove
from cdc_sink.ops.logs import get_logger

log = get_logger("cdc_sink.runner")

KAFKA_COMMIT_GRACE_S = 2.0  # at shutdown, for the last offsets to reach Kafka


class OffsetMirror:
    """Commits to Kafka, in the background, the newest offset moved of each partition still
    owned (`owned()`), one commit at a time. PostgreSQL holds the truth; a failed commit is
    logged and left for the next one."""

    def __init__(
        self, consumer: AIOKafkaConsumer, owned: Callable[[], Collection[TopicPartition]]
    ) -> None:
        self._consumer = consumer
        self._owned = owned
        self._to_commit: dict[TopicPartition, int] = {}  # offsets Kafka has not been told yet
        self._committer: asyncio.Task[None] | None = None

    def mirror(self, moves: list[CheckpointMove]) -> None:
        """Hand committed checkpoint moves over and return at once: aiokafka's commit waits for
        a group coordinator without a bound, so with the broker away an awaited commit would
        hold up every write (and a shutdown) until it is back."""
        for move in moves:
            self._to_commit[TopicPartition(move.topic, move.partition)] = move.next_offset
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_pending())

    async def _commit_pending(self) -> None:
        while self._to_commit:
            owned = self._owned()
            offsets = {tp: o for tp, o in self._to_commit.items() if tp in owned}
            self._to_commit = {}
            if not offsets:
                continue
            try:
                await self._consumer.commit(offsets)
            except KafkaError as exc:  # CommitFailedError too
                log.warning("kafka_commit_failed", error=str(exc))

    async def finish(self) -> None:
        """At shutdown: let the committer finish briefly, then drop what it still holds."""
        if self._committer is None or self._committer.done():
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._committer, KAFKA_COMMIT_GRACE_S)
