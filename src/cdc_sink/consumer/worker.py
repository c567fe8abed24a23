"""The worker: the consumer loop, the only place that knows the order of the stages.

fetch (consumer/pipeline.py) → prepare (decode, interpret, resolve, convert) → apply (one
PostgreSQL transaction per chunk, checkpoints inside) → mirror the offsets to Kafka. On
assignment each partition is claimed in `_cdc_checkpoints` (its fencing epoch goes up) and read
from the offset stored there, by a pipeline opened for the new assignment.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from cdc_sink.config import Config
from cdc_sink.consumer.applier import BatchApplier
from cdc_sink.consumer.offsets import OffsetMirror
from cdc_sink.consumer.ownership import KAFKA_QUERY_TIMEOUT_S, Ownership, partition_names
from cdc_sink.consumer.pipeline import FetchPipeline
from cdc_sink.consumer.prepare import Prepared, Preparer
from cdc_sink.decode.decoder import Decoder
from cdc_sink.dlq.limiter import DlqLimiter
from cdc_sink.dlq.producer import DlqProducer
from cdc_sink.errors import FatalError
from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.metrics import Metrics
from cdc_sink.ops.secrets import PostgresLogin
from cdc_sink.retry import RetryPolicy, Stopping
from cdc_sink.schema.catalog import Catalog
from cdc_sink.schema.tables import name_collisions

log = get_logger("cdc_sink.runner")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.worker.group_state = "joining"  # a rebalance begins
        await self.worker.release(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self.worker.claim(assigned)
        self.worker.group_state = "joined"  # with no partitions, too: an idle member


class Worker:
    """One consumer-group member applying its partitions to PostgreSQL until stopped."""

    def __init__(self, config: Config, *, stop_when_caught_up: bool = False) -> None:
        self.config = config
        self.metrics = Metrics()
        self.stop_when_caught_up = stop_when_caught_up
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.paused: set[TopicPartition] = set()  # over the DLQ limit, until resumed
        self.limiter = DlqLimiter(config.dlq.max_share, config.dlq.window_records)
        self.applier: BatchApplier | None = None  # once `use` hands the resources over
        self.stopping = asyncio.Event()
        # Held while a chunk is applied, so a revocation or a resume waits for it.
        self._batch_lock = asyncio.Lock()
        self.retry = RetryPolicy.of(config.sink)
        self.ownership = Ownership(config, self.metrics, self.retry, self.worker_id)
        self.owned = self.ownership.owned  # the partitions held
        self.pool: asyncpg.Pool | None = None  # claims, catalog, housekeeping, readiness
        self.login: PostgresLogin | None = None
        self.consumer: AIOKafkaConsumer | None = None  # once `consume` is handed it
        self._pipeline: FetchPipeline | None = None
        # starting → joining (subscribed, or rebalancing) → joined → leaving
        self.group_state = "starting"

    # resources ------------------------------------------------------------------------------

    def use(
        self,
        *,
        pool: asyncpg.Pool,
        writer_pool: asyncpg.Pool,
        login: PostgresLogin,
        decoder: Decoder,
        catalog: Catalog,
        dlq: DlqProducer,
    ) -> None:
        """Hand the worker what the composition root opened (and will close)."""
        self.pool, self.login = pool, login
        self.preparer = Preparer(decoder, catalog, self.metrics, self.retry, self.stopping)
        self.applier = BatchApplier(
            self.config,
            self.metrics,
            self.retry,
            self.stopping,
            owned=self.owned,
            paused=self.paused,
            limiter=self.limiter,
            pool=pool,
            writer_pool=writer_pool,
            login=login,
            dlq=dlq,
        )

    @property
    def applied_events(self) -> int:
        """Events committed or dead-lettered so far."""
        return self.applier.applied_events if self.applier is not None else 0

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when the worker can do its work: it has joined its consumer group or is
        joining it (a rebalance), and PostgreSQL answers. Holding no partitions is not
        unready: a pod beyond the partition count, or one mid-rebalance, is idle and well."""
        postgres = False
        if self.pool is not None:
            try:
                postgres = await asyncio.wait_for(self.pool.fetchval("SELECT true"), 2)
            except Exception:  # noqa: BLE001 - any failure means not reachable
                postgres = False
        group = self.group_state
        detail = {"postgres": postgres, "group": group, "assigned_partitions": len(self.owned)}
        return bool(postgres and group in ("joining", "joined")), detail

    def stop(self) -> None:
        """Stop fetching; the batch in flight finishes (or, if it is waiting to be retried,
        is abandoned uncommitted), then `consume` returns."""
        self.stopping.set()

    # assignment -----------------------------------------------------------------------------

    async def claim(self, assigned: Sequence[TopicPartition]) -> None:
        """Take over partitions (Ownership.claim); read them from their checkpoints."""
        assert self.consumer is not None
        assert self.pool is not None
        if await self.ownership.claim(self.consumer, self.pool, assigned):
            self._reposition()

    async def release(self, revoked: Sequence[TopicPartition]) -> None:
        """Let go of partitions once the batch in flight (if any) is finished."""
        async with self._batch_lock:
            self.ownership.release(revoked)
            for tp in revoked:
                if tp in self.paused:
                    self._unpause(tp)  # whoever gets it next starts afresh
            if self.applier is not None:
                self.applier.forget({(tp.topic, tp.partition) for tp in revoked})
            self._reposition()
        self.metrics.assigned_partitions.set(len(self.owned))
        log.info("partitions_revoked", partitions=partition_names(revoked))

    def _reposition(self) -> None:
        """What is read or prepared ahead is no longer right: the loop replaces the pipeline
        with one that reads every partition from its checkpoint."""
        if self._pipeline is not None:
            self._pipeline.stale = True

    # the loop -------------------------------------------------------------------------------

    async def consume(self, consumer: AIOKafkaConsumer) -> None:
        """Join the group with `consumer` (started, and stopped afterwards, by the caller) and
        apply its records until stopped (or caught up); `use` must have handed the resources
        over."""
        assert self.applier is not None
        self.consumer = consumer
        offsets = self.applier.offsets = OffsetMirror(consumer, self.owned.keys)
        self._pipeline = self._open_pipeline()
        try:
            await self._warn_of_name_collisions()
            consumer.subscribe(pattern=self.config.kafka.topic_pattern, listener=_Rebalance(self))
            self.group_state = "joining"
            await self._loop()
        except Stopping as exc:
            log.info("batch_abandoned", reason=str(exc))
        finally:
            self.group_state = "leaving"
            await self._close_on_exit()
            await offsets.finish()

    def _open_pipeline(self) -> FetchPipeline:
        assert self.consumer is not None
        return FetchPipeline(
            self.consumer,
            self.preparer,
            self._apply,
            owned=self.owned,
            paused=self.paused,
            batch_size=self.config.sink.batch_size,
            linger_ms=self.config.sink.linger_ms,
            stopping=self.stopping,
        )

    async def _warn_of_name_collisions(self) -> None:
        """At start-up: say which tables of several keyspaces, by the topics the pattern
        matches, map to one target name (cdc_table_name_collisions); the worker goes on."""
        assert self.consumer is not None
        cfg = self.config
        try:
            topics = await asyncio.wait_for(self.consumer.topics(), KAFKA_QUERY_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            log.warning("topic_listing_failed", error=f"{type(exc).__name__}: {exc}")
            return
        pattern = re.compile(cfg.kafka.topic_pattern)
        matched = [topic for topic in topics if pattern.match(topic)]
        collisions = name_collisions(matched, cfg.sink.table_name_format)
        self.metrics.table_name_collisions.set(len(collisions))
        for target, sources in sorted(collisions.items()):
            log.error(
                "table_name_collision",
                target=target,
                sources=sources,
                table_name_format=cfg.sink.table_name_format,
                action=(
                    "the table is applied for the one that made (or makes) it, the others' "
                    "events are dead-lettered: put {keyspace} in CDC_SINK__TABLE_NAME_FORMAT "
                    "(e.g. cdc_{keyspace}_{table}); see the README, 'One target table, one "
                    "Cassandra table'"
                ),
            )

    async def _loop(self) -> None:
        """Fetch, prepare and apply until stopped (or caught up)."""
        assert self.consumer is not None
        assert self.applier is not None
        assert self._pipeline is not None
        while not self.stopping.is_set():
            if self.login is not None and self.login.expired():
                raise FatalError(
                    "the PostgreSQL login leased from Vault has expired: Vault could not be "
                    "reached to renew or replace it (see the vault_renewal_failed lines)",
                    stage="vault",
                )
            if not self._pipeline.applying:
                await self.applier.follow_login()
            if self.ownership.unclaimed and await self.ownership.claim_unclaimed(
                self.consumer, self.pool
            ):
                self._reposition()
            if self._pipeline.stale:
                await self._pipeline.close()
                self._pipeline = self._open_pipeline()
            await self._pipeline.step()
            await self.ownership.report_backlog(self.consumer)
            if (
                self.stop_when_caught_up
                and not self._pipeline.applying
                and self.ownership.caught_up()
            ):
                log.info("caught_up", events=self.applied_events)
                return

    async def _close_on_exit(self) -> None:
        """Close the pipeline: the chunk in flight finishes (a stop makes a retry wait give
        up), the prepared one is dropped (it is read again after a restart)."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is None:
            return
        if pipeline.applying:
            self.stopping.set()
        try:
            await pipeline.close()
        except Stopping as exc:
            log.info("batch_abandoned", reason=str(exc))
        except Exception as exc:  # noqa: BLE001 - the first failure is already on its way up
            log.error("batch_failed_during_shutdown", error=f"{type(exc).__name__}: {exc}")

    async def _apply(self, prepared: Prepared) -> None:
        """Apply a chunk (what of it is still ours), then pause what passed the DLQ limit, or
        re-claim after being fenced."""
        assert self.applier is not None
        async with self._batch_lock:
            applied = await self.applier.apply(prepared)
            for tp in applied.paused:
                self._pause(tp)
            if applied.fenced:
                await self._resync()

    def _pause(self, tp: TopicPartition) -> None:
        """Stop a partition whose dead-letter share passed the limit: nothing of it is applied
        or dead-lettered until an operator resumes it (or the worker restarts)."""
        assert self.consumer is not None
        self.paused.add(tp)
        self._reposition()
        if tp in self.consumer.assignment():
            self.consumer.pause(tp)
        self.metrics.dlq_partition_paused.labels(tp.topic, str(tp.partition)).set(1)
        self.metrics.errors.labels("dlq", "limit").inc()
        log.error(
            "dlq_limit_paused",
            topic=tp.topic,
            partition=tp.partition,
            next_offset=self.owned[tp].next_offset if tp in self.owned else None,
            max_share=self.config.dlq.max_share,
            window_records=self.config.dlq.window_records,
            action="fix the cause, then POST /dlq/resume (or restart the worker)",
        )

    async def resume(
        self, topic: str | None = None, partition: int | None = None
    ) -> list[TopicPartition]:
        """Resume paused partitions (all, a topic's, or one) from their checkpoints; return
        which. The DLQ limit counts afresh for them. Before the consumer starts: none."""
        if self.consumer is None:
            return []
        async with self._batch_lock:
            chosen = [
                tp
                for tp in self.paused
                if (topic is None or tp.topic == topic)
                and (partition is None or tp.partition == partition)
            ]
            for tp in chosen:
                self._unpause(tp)
                if tp in self.owned and tp in self.consumer.assignment():
                    self.consumer.seek(tp, self.owned[tp].next_offset)
                    self.consumer.resume(tp)
            if chosen:
                self._reposition()
        if chosen:
            log.info("partitions_resumed", partitions=partition_names(chosen))
        return chosen

    def _unpause(self, tp: TopicPartition) -> None:
        self.paused.discard(tp)
        self.limiter.forget(tp.topic, tp.partition)
        self.metrics.dlq_partition_paused.labels(tp.topic, str(tp.partition)).set(0)

    async def _resync(self) -> None:
        """After being fenced: forget what we thought we owned; the rebalance re-assigns."""
        assert self.consumer is not None
        self.owned.clear()
        assignment = list(self.consumer.assignment())
        if assignment:
            await self.claim(assignment)
