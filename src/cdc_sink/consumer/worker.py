"""The worker: the only place that knows the order of the stages.

consume (aiokafka, group member) → decode → interpret → resolve table (DDL) → convert → plan and
write (one PostgreSQL transaction per batch, checkpoints inside) → acknowledge (Kafka commit,
for lag tooling only). On assignment each partition is claimed in `_cdc_checkpoints` (its
fencing epoch goes up) and the consumer seeks to the offset stored there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry import trace

from cdc_sink.config import Config
from cdc_sink.consumer import compression
from cdc_sink.consumer.applier import BatchApplier, PartitionPaused
from cdc_sink.consumer.offsets import OffsetMirror
from cdc_sink.consumer.ownership import Ownership
from cdc_sink.consumer.prepare import Prepared, Preparer
from cdc_sink.decode.decoder import Decoder
from cdc_sink.dlq.limiter import DlqLimiter
from cdc_sink.dlq.producer import DlqProducer
from cdc_sink.errors import FatalError
from cdc_sink.ops.kafka_security import client_security, unreachable
from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.metrics import Metrics
from cdc_sink.ops.secrets import PostgresLogin
from cdc_sink.retry import RetryPolicy, Stopping
from cdc_sink.schema.catalog import Catalog
from cdc_sink.schema.tables import name_collisions

log = get_logger("cdc_sink.runner")
tracer = trace.get_tracer("cdc_sink")  # a no-op until cdc_sink.ops.tracing installs a provider

BACKLOG_QUERY_TIMEOUT_S = 2.0
# At shutdown, for a Kafka client to leave the group and close: with the broker away, aiokafka
# may otherwise wait out a coordinator lookup or request timeout (tens of seconds).
KAFKA_CLOSE_TIMEOUT_S = 5.0


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

    def __init__(
        self, config: Config, *, stop_when_caught_up: bool = False, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.stop_when_caught_up = stop_when_caught_up
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.paused: set[TopicPartition] = set()  # over the DLQ limit, until resumed
        self.limiter = DlqLimiter(config.dlq.max_share, config.dlq.window_records)
        self.offsets: OffsetMirror | None = None
        self.applier: BatchApplier | None = None  # once `use` hands the resources over
        self.stopping = asyncio.Event()
        self._batch_lock = asyncio.Lock()
        # The pipeline: one chunk applying (`_in_flight`) while the next is fetched and
        # prepared (`_next`); `_taken` is each partition's next offset to take from a fetch.
        # Any change of ownership or position sets `_rewind`: the loop then finishes the chunk
        # in flight, drops what it holds and seeks every partition back to its checkpoint.
        self._in_flight: asyncio.Task[None] | None = None
        self._next: Prepared | None = None
        self._taken: dict[TopicPartition, int] = {}
        self._rewind = False
        self._fetching: asyncio.Future[dict[TopicPartition, list[Any]]] | None = None
        self.retry = RetryPolicy.of(config.sink)
        self.retrying = functools.partial(
            self.retry.run, stopping=self.stopping, metrics=self.metrics
        )
        self.ownership = Ownership(config, self.metrics, self.retry, self.worker_id)
        self.owned = self.ownership.owned  # the partitions held
        self._backlog_at = 0.0  # when cdc_backlog_depth was last refreshed (monotonic)
        self.pool: asyncpg.Pool | None = None  # claims, catalog, housekeeping, readiness
        self.login: PostgresLogin | None = None
        self.consumer: AIOKafkaConsumer | None = None
        # starting → joining (subscribed, or rebalancing) → joined → leaving
        self.group_state = "starting"
        self.dlq: DlqProducer | None = None

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
        """Hand the worker what the composition root opened (and will close): the pool for
        claims and readiness, the writer's pool of one, the PostgreSQL login it follows, the
        decoder, the catalog and the DLQ producer."""
        self.pool, self.login = pool, login
        self.decoder, self.catalog, self.dlq = decoder, catalog, dlq
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

    async def release_writer(self) -> None:
        """Hand the writer's connection back to its pool (at the end of the run)."""
        if self.applier is not None:
            await self.applier.release_writer()

    @property
    def applied_events(self) -> int:
        """Events committed or dead-lettered so far."""
        return self.applier.applied_events if self.applier is not None else 0

    @property
    def group(self) -> str:
        return self.config.kafka.group_id

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
        is abandoned uncommitted), then the worker leaves the group and `run` returns."""
        self.stopping.set()

    # assignment -----------------------------------------------------------------------------

    async def claim(self, assigned: Sequence[TopicPartition]) -> None:
        """Take over partitions (Ownership.claim); read them from their checkpoints."""
        assert self.consumer is not None
        assert self.pool is not None
        if await self.ownership.claim(self.consumer, self.pool, assigned):
            self._rewind = True

    async def release(self, revoked: Sequence[TopicPartition]) -> None:
        """Let go of partitions once the batch in flight (if any) is finished."""
        async with self._batch_lock:
            self.ownership.release(revoked)
            for tp in revoked:
                if tp in self.paused:
                    self._unpause(tp)  # whoever gets it next starts afresh
            if self.applier is not None:
                self.applier.forget({(tp.topic, tp.partition) for tp in revoked})
            self._rewind = True
        self.metrics.assigned_partitions.set(len(self.owned))
        log.info("partitions_revoked", partitions=[f"{t.topic}[{t.partition}]" for t in revoked])

    # the loop -------------------------------------------------------------------------------

    async def consume(self) -> None:
        """Join the group and apply its records until stopped (or caught up), then leave it;
        `use` must have handed the resources over."""
        cfg = self.config.kafka
        compression.install(cfg.max_inflated_batch_bytes)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers,
            group_id=cfg.group_id,
            client_id=cfg.client_id,
            enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset,
            session_timeout_ms=cfg.session_timeout_ms,
            max_poll_interval_ms=cfg.max_poll_interval_ms,
            fetch_max_bytes=cfg.fetch_max_bytes,
            max_partition_fetch_bytes=cfg.max_partition_fetch_bytes,
            fetch_min_bytes=cfg.fetch_min_bytes,
            fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            metadata_max_age_ms=30_000,
            **client_security(cfg),
        )
        try:
            await self.consumer.start()
        except KafkaError as exc:
            await stop_client("consumer", self.consumer.stop)
            raise unreachable(cfg, "consumer", exc) from exc
        self.offsets = OffsetMirror(self.consumer, self.owned.keys)
        assert self.applier is not None
        self.applier.offsets = self.offsets
        try:
            await self._warn_of_name_collisions()
            self.consumer.subscribe(pattern=cfg.topic_pattern, listener=_Rebalance(self))
            self.group_state = "joining"
            await self._pipeline()
        except Stopping as exc:
            log.info("batch_abandoned", reason=str(exc))
        finally:
            self.group_state = "leaving"
            await self._drain_pipeline()
            await self.offsets.finish()
            await stop_client("consumer", self.consumer.stop)

    async def _warn_of_name_collisions(self) -> None:
        """At start-up: if the topics the pattern matches show tables of several keyspaces
        that map to one target name, say so (and set cdc_table_name_collisions). The worker
        goes on: the target's owner is applied, the others' events are dead-lettered
        (TableOwnerError), and the other tables are not held up by a guess from topic names."""
        assert self.consumer is not None
        cfg = self.config
        try:
            topics = await asyncio.wait_for(self.consumer.topics(), BACKLOG_QUERY_TIMEOUT_S)
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

    async def _pipeline(self) -> None:
        """Fetch, prepare and apply until stopped (or caught up).

        A fetch is always outstanding, so aiokafka asks the broker for more while a chunk is
        prepared or applied, and the next chunk is decoded while the one in flight waits on
        PostgreSQL: both cut the time a record waits, and the CPU idle during a transaction
        is used."""
        assert self.consumer is not None
        assert self.applier is not None
        linger = self.config.sink.linger_ms
        while not self.stopping.is_set():
            if self.login is not None and self.login.expired():
                raise FatalError(
                    "the PostgreSQL login leased from Vault has expired: Vault could not be "
                    "reached to renew or replace it (see the vault_renewal_failed lines)",
                    stage="vault",
                )
            if self._in_flight is None:
                await self.applier.follow_login()
            if self.ownership.unclaimed and await self.ownership.claim_unclaimed(
                self.consumer, self.pool
            ):
                self._rewind = True
            if self._rewind:
                await self._rewind_to_checkpoints()
            if self._fetching is None:
                # No max_records: with it, aiokafka serves one partition's buffer at a time
                # and waits a fetch round trip between calls. Chunks are cut in `_take`.
                self._fetching = asyncio.ensure_future(
                    compression.within_fetch_budget(self.consumer.getmany(timeout_ms=linger))
                )
            waiting: set[asyncio.Future[Any]] = {self._fetching}
            if self._in_flight is not None:
                waiting.add(self._in_flight)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if self._in_flight is not None and self._in_flight.done():
                await self._settle()
            if self._fetching.done():
                fetched, self._fetching = self._fetching.result(), None
                if not self._rewind:  # else fetched before a seek: read again after it
                    await self._take(fetched)
            if self._in_flight is None and self._next is not None and not self._rewind:
                self._submit(self._next)
                self._next = None
            await self._report_backlog()
            if self.stop_when_caught_up and self._in_flight is None and self.ownership.caught_up():
                log.info("caught_up", events=self.applied_events)
                return

    async def _take(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        """Prepare fetched records into the next chunk, handing each full chunk over to be
        applied as soon as the one in flight is done. Each partition's records stay
        contiguous and in offset order; records of a partition not ours are dropped (a claim
        seeks it to its checkpoint)."""
        records: list[Any] = []
        for tp, batch in fetched.items():
            owned = self.owned.get(tp)
            if owned is None or tp in self.paused:
                continue
            start = self._taken.get(tp, owned.next_offset)
            fresh = [r for r in batch if r.offset >= start]
            if fresh:
                self._taken[tp] = fresh[-1].offset + 1
                records.extend(fresh)
        size = self.config.sink.batch_size
        while records and not self.stopping.is_set() and not self._rewind:
            room = size - (len(self._next.records) if self._next is not None else 0)
            chunk, records = records[:room], records[room:]
            prepared = await self.preparer.prepare(chunk, self._applying)
            if self._next is None:
                self._next = prepared
            else:
                self._next.extend(prepared)
            if len(self._next.records) >= size:
                await self._settle()
                if self._must_rewind():  # the chunk in flight paused a partition
                    return
                self._submit(self._next)
                self._next = None

    def _applying(self) -> bool:
        return self._in_flight is not None

    def _must_rewind(self) -> bool:
        return self._rewind  # a method, so type checkers do not assume it unchanged by awaits

    def _submit(self, prepared: Prepared) -> None:
        assert self._in_flight is None
        self._in_flight = asyncio.create_task(self._apply_in_order(prepared))

    async def _apply_in_order(self, prepared: Prepared) -> None:
        async with self._batch_lock:
            await self._apply_prepared(prepared)

    async def _settle(self) -> None:
        """Wait for the chunk in flight; its failure (fatal, or Stopping) is raised here."""
        task, self._in_flight = self._in_flight, None
        if task is not None:
            await task

    async def _rewind_to_checkpoints(self) -> None:
        """After a claim, release, pause or resume: drop what was fetched or prepared ahead
        and read every partition again from its checkpoint."""
        assert self.consumer is not None
        await self._cancel_fetch()
        await self._settle()
        self._next = None
        self._taken.clear()
        self._rewind = False
        assignment = self.consumer.assignment()
        for tp, owned in self.owned.items():
            if tp in assignment:
                self.consumer.seek(tp, owned.next_offset)

    async def _cancel_fetch(self) -> None:
        fetching, self._fetching = self._fetching, None
        if fetching is not None and not fetching.done():
            fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError, KafkaError):
                await fetching
        elif fetching is not None and not fetching.cancelled():
            fetching.exception()  # retrieved, so asyncio does not report it

    async def _drain_pipeline(self) -> None:
        """On the way out: stop fetching, let the chunk in flight finish (a stop makes a
        retry wait give up), drop the prepared one (it is read again after a restart)."""
        await self._cancel_fetch()
        self._next = None
        task, self._in_flight = self._in_flight, None
        if task is None:
            return
        self.stopping.set()
        try:
            await task
        except Stopping as exc:
            log.info("batch_abandoned", reason=str(exc))
        except Exception as exc:  # noqa: BLE001 - the first failure is already on its way up
            log.error("batch_failed_during_shutdown", error=f"{type(exc).__name__}: {exc}")

    async def _report_backlog(self) -> None:
        """Refresh cdc_backlog_depth from the end offsets, at most once a second."""
        assert self.consumer is not None
        if not self.owned or time.monotonic() - self._backlog_at < 1.0:
            return
        self._backlog_at = time.monotonic()
        try:
            # aiokafka waits up to its request timeout (40 s) for a broker that is down; a
            # metric must not hold up the loop (nor a shutdown) that long.
            ends = await asyncio.wait_for(
                self.consumer.end_offsets(list(self.owned)), BACKLOG_QUERY_TIMEOUT_S
            )
        except (KafkaError, TimeoutError):
            return
        for tp, owned in self.owned.items():
            lag = max(0, ends.get(tp, owned.next_offset) - owned.next_offset)
            self.metrics.backlog_depth.labels(tp.topic, str(tp.partition)).set(lag)

    async def _apply_prepared(self, prepared: Prepared) -> None:
        """Apply a prepared chunk if each partition's records still start at its checkpoint;
        otherwise (a rebalance, fencing or a pause moved things meanwhile) apply what is left.
        Then pause what passed the DLQ limit, or re-claim after being fenced."""
        assert self.applier is not None
        if not all(
            tp in self.owned and tp not in self.paused and self.owned[tp].next_offset == first
            for tp, first in prepared.first.items()
        ):

            def current(r: Any) -> bool:
                owned = self.owned.get(TopicPartition(r.topic, r.partition))
                return owned is not None and r.offset >= owned.next_offset

            prepared = prepared.part(current)
        for outcome in await self.applier.apply(prepared):
            if isinstance(outcome, PartitionPaused):
                self._pause(outcome.partition)
            else:
                await self._resync()

    def _pause(self, tp: TopicPartition) -> None:
        """Stop a partition whose dead-letter share passed the limit: nothing of it is applied
        or dead-lettered until an operator resumes it (or the worker restarts)."""
        assert self.consumer is not None
        self.paused.add(tp)
        self._rewind = True
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
                self._rewind = True
        if chosen:
            log.info("partitions_resumed", partitions=[f"{t.topic}[{t.partition}]" for t in chosen])
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


async def stop_client(name: str, stop: Callable[[], Awaitable[None]]) -> None:
    """Close a Kafka client, giving up after KAFKA_CLOSE_TIMEOUT_S (nothing is lost: the
    offsets are in PostgreSQL, and the group notices a member gone at session timeout)."""
    task = asyncio.ensure_future(stop())
    done, _ = await asyncio.wait({task}, timeout=KAFKA_CLOSE_TIMEOUT_S)
    if done:
        task.result()
        return
    # Not awaited after cancel(): a close that does not yield to cancellation promptly
    # must not hold the shutdown either.
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    log.warning("kafka_close_timeout", client=name, timeout_s=KAFKA_CLOSE_TIMEOUT_S)
