"""Partition ownership and fencing: which partitions this worker holds, claimed in
`_cdc_checkpoints` (each claim raises the partition's epoch, so a writer that lost it can no
longer commit), and released when the group takes them away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from cdc_sink.config import Config
from cdc_sink.errors import FatalError
from cdc_sink.failures import Kind, classify
from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.metrics import Metrics
from cdc_sink.retry import RetryPolicy

log = get_logger("cdc_sink.runner")

# aiokafka waits up to its request timeout (40 s) for a broker that is down; a metric or a
# warning must not hold up the loop (nor a shutdown) that long.
KAFKA_QUERY_TIMEOUT_S = 2.0


@dataclass
class Owned:
    """A partition this worker holds: its fencing epoch and the next offset to apply."""

    epoch: int
    next_offset: int


class Ownership:
    """The partitions held (`owned`), those assigned whose claim failed (`unclaimed`, none of
    their records is applied until a retry of the claim succeeds), and each partition's end
    offset when it was first assigned (what "caught up" means)."""

    def __init__(self, config: Config, metrics: Metrics, retry: RetryPolicy, owner: str) -> None:
        self.config = config
        self.metrics = metrics
        self.retry = retry
        self.owner = owner
        self.owned: dict[TopicPartition, Owned] = {}
        self.unclaimed: set[TopicPartition] = set()
        self._failures = 0
        self._retry_at = 0.0  # monotonic
        self._end_at_start: dict[TopicPartition, int] = {}
        self._backlog_at = 0.0  # when cdc_backlog_depth was last refreshed (monotonic)

    async def claim(
        self, consumer: AIOKafkaConsumer, pool: asyncpg.Pool, assigned: Sequence[TopicPartition]
    ) -> bool:
        """Take over partitions: raise their epoch and seek to the stored offsets; whether
        they were claimed. Never raises (aiokafka would swallow it): partitions whose claim
        failed wait for `claim_unclaimed`."""
        if not assigned:
            return False
        try:
            await self._claim(consumer, pool, assigned)
        except Exception as exc:  # noqa: BLE001 - the loop retries, or stops on a fatal one
            self.unclaimed.update(assigned)
            self.metrics.errors.labels("claim", "transient").inc()
            log.warning(
                "claim_failed",
                partitions=partition_names(assigned),
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        return True

    async def claim_unclaimed(self, consumer: AIOKafkaConsumer, pool: asyncpg.Pool) -> bool:
        """Claim again the partitions still assigned whose claim failed, with the retry
        policy's backoff; whether any were claimed. After the last attempt (or on a
        non-transient error) FatalError, nothing committed."""
        assignment = consumer.assignment()
        self.unclaimed = {tp for tp in self.unclaimed if tp in assignment}
        self.unclaimed -= self.owned.keys()
        if not self.unclaimed or time.monotonic() < self._retry_at:
            return False
        try:
            await self._claim(consumer, pool, sorted(self.unclaimed))
        except Exception as exc:
            self._failures += 1
            if classify(exc) is not Kind.TRANSIENT or self.retry.gives_up(self._failures):
                raise FatalError(
                    f"cannot claim partitions ({type(exc).__name__}: {exc}); nothing committed",
                    stage="claim",
                ) from exc
            delay = self.retry.delay(self._failures - 1)
            self._retry_at = time.monotonic() + delay
            self.metrics.retries.labels("claim").inc()
            log.warning(
                "claim_retry",
                attempt=self._failures,
                delay_s=round(delay, 3),
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        self.unclaimed.clear()
        self._failures = 0
        return True

    async def _claim(
        self, consumer: AIOKafkaConsumer, pool: asyncpg.Pool, assigned: Sequence[TopicPartition]
    ) -> None:
        log_starts = await consumer.beginning_offsets(list(assigned))
        ends = await consumer.end_offsets(list(assigned))
        starts = ends if self.config.kafka.auto_offset_reset == "latest" else log_starts
        for tp in assigned:  # "caught up" means: up to the end seen when we first got it
            self._end_at_start.setdefault(tp, ends[tp])
        claimed: dict[TopicPartition, Owned] = {}
        async with pool.acquire() as conn:
            for tp in assigned:
                row = await conn.fetchrow(
                    "INSERT INTO _cdc_checkpoints (consumer_group, topic, kafka_partition, "
                    "next_offset, epoch, owner) VALUES ($1, $2, $3, $4, 1, $5) "
                    "ON CONFLICT (consumer_group, topic, kafka_partition) DO UPDATE SET "
                    "epoch = _cdc_checkpoints.epoch + 1, owner = EXCLUDED.owner, "
                    "updated_at = now() RETURNING next_offset, epoch",
                    self.config.kafka.group_id,
                    tp.topic,
                    tp.partition,
                    starts[tp],
                    self.owner,
                )
                claimed[tp] = Owned(row["epoch"], row["next_offset"])
                if row["next_offset"] < log_starts[tp]:
                    self._report_lost(tp, row["next_offset"], log_starts[tp])
                consumer.seek(tp, max(row["next_offset"], log_starts[tp]))
        self.owned.update(claimed)
        self.metrics.assigned_partitions.set(len(self.owned))
        log.info("partitions_assigned", partitions=partition_names(assigned))

    def _report_lost(self, tp: TopicPartition, checkpoint: int, log_start: int) -> None:
        """Kafka no longer holds the records from the checkpoint on (retention deleted them,
        e.g. after a restore from a backup older than the topic's retention): the worker goes
        on from the log's start, and says loudly what PostgreSQL is missing."""
        self.metrics.errors.labels("claim", "offsets_lost").inc()
        log.error(
            "offsets_lost_to_retention",
            topic=tp.topic,
            partition=tp.partition,
            checkpoint=checkpoint,
            log_start=log_start,
            lost=log_start - checkpoint,
            action="reconcile the partition's tables with repair (see Disaster recovery)",
        )

    def release(self, revoked: Sequence[TopicPartition]) -> None:
        """Forget partitions the group took away, and stop reporting them (their new owner
        does; stale values here would raise alerts)."""
        for tp in revoked:
            self.owned.pop(tp, None)
            self.metrics.backlog_depth.remove(tp.topic, str(tp.partition))
            self.metrics.last_commit_timestamp.remove(tp.topic, str(tp.partition))
        self.unclaimed.difference_update(revoked)

    def caught_up(self) -> bool:
        """Every partition held is applied up to the end it had when first assigned."""
        return (
            bool(self.owned)
            and not self.unclaimed
            and all(owned.next_offset >= self._end_at_start[tp] for tp, owned in self.owned.items())
        )

    async def report_backlog(self, consumer: AIOKafkaConsumer) -> None:
        """Refresh cdc_backlog_depth from the end offsets, at most once a second."""
        if not self.owned or time.monotonic() - self._backlog_at < 1.0:
            return
        self._backlog_at = time.monotonic()
        try:
            ends = await asyncio.wait_for(
                consumer.end_offsets(list(self.owned)), KAFKA_QUERY_TIMEOUT_S
            )
        except (KafkaError, TimeoutError):
            return
        for tp, owned in self.owned.items():
            lag = max(0, ends.get(tp, owned.next_offset) - owned.next_offset)
            self.metrics.backlog_depth.labels(tp.topic, str(tp.partition)).set(lag)


def partition_names(partitions: Iterable[TopicPartition]) -> list[str]:
    """`topic[partition]` of each, as the log lines name partitions."""
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]
