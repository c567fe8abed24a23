"""The batch applier: one PostgreSQL transaction per prepared chunk, data errors isolated by
halves down to the record at fault, and the DLQ guard. It never touches the consumer: what
the consumer must do (pause a partition, re-claim after being fenced) it returns."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import TopicPartition
from opentelemetry import trace

from cdc_sink.apply.suppression import Suppression
from cdc_sink.apply.writer import Batch, BatchResult, CheckpointMove, PgWriter, reserve_dlq_ids
from cdc_sink.config import Config
from cdc_sink.consumer.offsets import OffsetMirror
from cdc_sink.consumer.ownership import Owned
from cdc_sink.consumer.prepare import Outcome, Prepared, dead_letter
from cdc_sink.dlq.letters import DeadLetter
from cdc_sink.dlq.limiter import DlqLimiter
from cdc_sink.dlq.producer import DlqProducer
from cdc_sink.errors import FencedError
from cdc_sink.failures import Kind, classify, refused
from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.metrics import DEAD_LETTER, STREAM, Metrics, observe_all
from cdc_sink.ops.secrets import PostgresLogin
from cdc_sink.retry import RetryPolicy

log = get_logger("cdc_sink.runner")
tracer = trace.get_tracer("cdc_sink")


@dataclass
class Applied:
    """What the consumer must do after `apply`: pause the partitions in `paused` (their dead
    letters would pass the DLQ limit; nothing of them past their checkpoint was applied), and
    if `fenced` (another worker claimed a partition meanwhile; nothing of the rest was
    applied) re-claim what is still assigned."""

    paused: set[TopicPartition] = field(default_factory=set)
    fenced: bool = False


class BatchApplier:
    """Applies prepared chunks of the partitions in `owned` through the writer's connection
    (which follows the PostgreSQL login), produces their dead letters first, and after each
    COMMIT moves the partitions' offsets, counts and mirrors them to Kafka."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        retry: RetryPolicy,
        stopping: asyncio.Event,
        *,
        owned: dict[TopicPartition, Owned],
        paused: Set[TopicPartition],
        limiter: DlqLimiter,
        pool: asyncpg.Pool,
        writer_pool: asyncpg.Pool,
        login: PostgresLogin,
        dlq: DlqProducer,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.retrying = functools.partial(retry.run, stopping=stopping, metrics=metrics)
        self.owned = owned
        self.paused = paused
        self.limiter = limiter
        self.pool = pool
        self.writer_pool = writer_pool
        self.login = login
        self.dlq = dlq
        self.group = config.kafka.group_id
        self.offsets: OffsetMirror | None = None  # once the consumer is open
        self.applied_events = 0
        # Produced, not yet committed, by (topic, partition, offset).
        self._dlq_sent: dict[tuple[str, int, int], DeadLetter] = {}
        # Positions of dead letters of erased keys, neither produced nor stored, until their
        # offsets move.
        self._erased: set[tuple[str, int, int]] = set()
        self.writer: PgWriter | None = None  # on a connection of `writer_pool`
        self.suppression = Suppression(config.gdpr.hash_key)
        self._writer_generation = 0  # the login's generation the writer's connection has

    async def apply(self, prepared: Prepared) -> Applied:
        """Apply what of a chunk is still to be applied (a rebalance, fencing or a pause may
        have moved its partitions since it was prepared); return what the consumer must do
        (nothing when every record was committed or dead-lettered). Raises FatalError
        (nothing committed) and Stopping."""
        owned, paused = self.owned, self.paused
        if not all(
            tp in owned and tp not in paused and owned[tp].next_offset == first
            for tp, first in prepared.first.items()
        ):

            def current(r: Any) -> bool:
                held = owned.get(tp := TopicPartition(r.topic, r.partition))
                return held is not None and tp not in paused and r.offset >= held.next_offset

            prepared = prepared.part(current)
        done = Applied()
        await self._apply_part(prepared, done)
        return done

    def forget(self, revoked: set[tuple[str, int]]) -> None:
        """Drop the dead letters sent for partitions let go (a letter holds its record)."""
        self._dlq_sent = {k: v for k, v in self._dlq_sent.items() if k[:2] not in revoked}
        self._erased = {k for k in self._erased if k[:2] not in revoked}

    async def release_writer(self) -> None:
        """Hand the writer's connection back to its pool (at the end of the run)."""
        if self.writer is not None:
            await self.writer_pool.release(self.writer.conn)

    async def open_writer(self) -> None:
        """Give the writer a fresh connection of its pool. If that fails the worker has no
        writer (never one on a connection already handed back), and the next attempt opens one."""
        old, self.writer = self.writer, None
        if old is not None:
            try:
                # Closed when handed back, not kept idle: the pool may not have been told of
                # a new login yet, and would hand the same connection (the old user's) back.
                await self.writer_pool.expire_connections()
                await self.writer_pool.release(old.conn)
            except Exception as exc:  # noqa: BLE001 - a broken connection is dropped anyway
                log.warning("writer_release_failed", error=f"{type(exc).__name__}: {exc}")
        generation = self.login.generation
        conn = await self.writer_pool.acquire()
        self._writer_generation = generation
        self.writer = PgWriter(conn, self.config.postgres.schema, self.group, self.suppression)

    async def follow_login(self) -> None:
        """Between transactions: once a new PostgreSQL user is leased, move the writer to a
        connection of it now, not at the next batch (a quiet topic would otherwise keep the
        old user's session open after its lease ends)."""
        if self.writer is None or not self._writer_stale():
            return
        try:
            await self.open_writer()
        except Exception as exc:  # noqa: BLE001 - the next transaction opens one, or retries
            log.warning("writer_reconnect_failed", error=f"{type(exc).__name__}: {exc}")

    def _writer_stale(self) -> bool:
        """The writer's connection is of a PostgreSQL user since replaced."""
        return self._writer_generation != self.login.generation

    async def _usable_writer(self) -> PgWriter:
        """The writer, first moved to a fresh connection if it has none (reconnecting failed),
        its connection died, or a new PostgreSQL user was leased."""
        try:
            usable = self.writer is not None and not self.writer.conn.is_closed()
        except asyncpg.InterfaceError:  # lost while idle: asyncpg handed it back to the pool
            usable = False
        if not usable or self._writer_stale():
            await self.open_writer()
        assert self.writer is not None
        return self.writer

    async def _apply_part(self, prepared: Prepared, done: Applied) -> None:
        """Apply part of a chunk (each partition's records contiguous, in offset order), traced
        as one `cdc.batch` span from its preparing to its commit."""
        if done.fenced:
            return  # the checkpoints it would start from are no longer ours
        # A partition paused by an earlier half of a bisect must not be applied past its
        # unapplied records.
        if done.paused:
            prepared = prepared.part(
                lambda r: TopicPartition(r.topic, r.partition) not in done.paused
            )
        if not prepared.records:
            return
        began = prepared.began_ns or None
        with tracer.start_as_current_span("cdc.batch", start_time=began) as span:
            if span.is_recording():
                span.set_attributes(prepared.trace_attributes())
            if span.is_recording() and began:
                preparing = tracer.start_span("cdc.prepare", start_time=began)
                preparing.end(end_time=prepared.ready_ns)
            span.set_attribute("cdc.outcome", await self._apply_chunk(prepared, done))

    async def _apply_chunk(self, prepared: Prepared, done: Applied) -> str:
        """One transaction; bad data is isolated by halves down to the record at fault.
        Returns what became of the chunk (for its trace span)."""
        erased = await self._find_erased(prepared.batch.dead_letters)
        if over := self._over_dlq_limit(prepared):
            # Apply what precedes each such partition's first dead letter, then pause it.
            await self._apply_part(
                done=done,
                prepared=prepared.part(
                    lambda r: (
                        r.offset < over.get(TopicPartition(r.topic, r.partition), r.offset + 1)
                    )
                ),
            )
            done.paused.update(over)
            return "paused"
        batch = prepared.batch
        batch.checkpoints = [self._move(tp, offset + 1) for tp, offset in prepared.last.items()]
        records = prepared.records
        try:
            batch.dead_letters = await self._send_dead_letters(
                [d for d in batch.dead_letters if _position(d) not in self._erased]
            )
            result = await self._apply_with_retry(batch)
        except FencedError as exc:
            log.warning("fenced", error=str(exc))
            self.metrics.errors.labels("write", "fenced").inc()
            done.fenced = True
            return "fenced"
        except Exception as exc:  # transient ones were retried: what is left is data or fatal
            if classify(exc) is not Kind.POISON:
                if isinstance(exc, asyncpg.PostgresError):
                    raise refused("the batch", exc, "write") from exc
                raise
            if len(records) > 1:
                first, second = prepared.halves()
                await self._apply_part(first, done)
                await self._apply_part(second, done)
                return "split"
            return await self._apply_dead_letter(records[0], prepared.outcomes[0], exc, done)
        self._acknowledge(batch, result, prepared.counts, prepared.stamps, erased)
        return "committed"

    def _over_dlq_limit(self, prepared: Prepared) -> dict[TopicPartition, int]:
        """The partitions whose dead letters in this chunk would pass the DLQ limit, each with
        the offset of its first dead letter."""
        offsets: dict[TopicPartition, list[int]] = {}
        for letter in prepared.batch.dead_letters:
            if _position(letter) in self._erased:
                continue  # skipped, not dead-lettered
            offsets.setdefault(TopicPartition(letter.topic, letter.partition), []).extend(
                letter.offsets(self.limiter.window)
            )
        return {
            tp: dead[0]
            for tp, dead in offsets.items()
            if not self.limiter.admits(tp.topic, tp.partition, dead, prepared.last[tp])
        }

    async def _find_erased(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        """Those of `letters` whose row key was erased (one look-up per table, only for letters
        not yet produced): they are skipped, neither produced nor stored. An erasure committed
        after this look-up is caught by the writer under the keys' locks, so `_cdc_dlq_records`
        never keeps such a letter; its DLQ message is then already sent, and stays in the DLQ
        topic (as the record stays in its own) until Kafka's retention."""
        seen = self._dlq_sent.keys() | self._erased
        todo = [d for d in letters if d.row is not None and _position(d) not in seen]
        if todo:

            async def attempt() -> list[DeadLetter]:
                return await (await self._usable_writer()).erased_letters(todo)

            erased = await self.retrying("dlq", attempt, on_retry=self.open_writer)
            self._erased.update(map(_position, erased))
        return [d for d in letters if _position(d) in self._erased]

    async def _apply_with_retry(self, batch: Batch) -> BatchResult:
        async def attempt() -> BatchResult:
            with tracer.start_as_current_span("cdc.transaction") as span:
                if span.is_recording():
                    span.set_attributes(
                        {
                            "db.system.name": "postgresql",
                            "cdc.rows": sum(len(m) for _, m in batch.tables),
                            "cdc.dead_letters": len(batch.dead_letters),
                        }
                    )
                result = await (await self._usable_writer()).apply(batch)
                self.metrics.transaction_duration.observe(result.duration_s)
                return result

        return await self.retrying("write", attempt, on_retry=self.open_writer)

    async def _send_dead_letters(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        """Produce dead letters to the DLQ topic (acks=all) before their offsets can move;
        return them as sent, each with the `_cdc_dlq_records` id its DLQ message names (a
        letter sent before, for a batch being retried or split, as it was sent then)."""
        todo = [d for d in letters if _position(d) not in self._dlq_sent]
        if todo:
            try:
                ids = await self.retrying(
                    "dlq", functools.partial(reserve_dlq_ids, self.pool, len(todo))
                )
            except asyncpg.PostgresError as exc:  # not transient: e.g. a privilege missing
                raise refused("reserving dead-letter ids", exc, "dlq") from exc
            todo = [dataclasses.replace(d, dlq_id=i) for d, i in zip(todo, ids, strict=True)]
            with tracer.start_as_current_span(
                "cdc.dlq.produce", attributes={"cdc.letters": len(todo)}
            ):
                sent = await self.retrying(
                    "dlq", functools.partial(self.dlq.send_letters, todo, self.group)
                )
            self._dlq_sent.update((_position(d), d) for d in sent)
        return [self._dlq_sent[_position(d)] for d in letters]

    async def _apply_dead_letter(
        self, record: Any, outcome: Outcome, exc: BaseException, done: Applied
    ) -> str:
        """Dead-letter the one record PostgreSQL refuses, skip it if its key was erased, or
        pause its partition if dead-lettering it would pass the DLQ limit; returns which (for
        the trace)."""
        tp = TopicPartition(record.topic, record.partition)
        row = (outcome[1], outcome[0].key) if isinstance(outcome, tuple) else None
        letter = dead_letter(record, exc, "write", row)
        erased = await self._find_erased([letter])
        if not erased and not self.limiter.admits(
            tp.topic, tp.partition, [record.offset], record.offset
        ):
            done.paused.add(tp)
            return "paused"
        move = self._move(tp, record.offset + 1)
        self.metrics.errors.labels("write", "poison").inc()
        letters = [] if erased else await self._send_dead_letters([letter])
        batch = Batch(dead_letters=letters, checkpoints=[move])
        self._acknowledge(batch, await self._apply_with_retry(batch), {}, {}, erased)
        return "erased" if erased else "dead_lettered"

    def _move(self, tp: TopicPartition, next_offset: int) -> CheckpointMove:
        """The checkpoint move of an owned partition from its checkpoint to `next_offset`."""
        owned = self.owned[tp]
        return CheckpointMove(tp.topic, tp.partition, owned.next_offset, next_offset, owned.epoch)

    def _acknowledge(
        self,
        batch: Batch,
        result: BatchResult,
        counts: dict[tuple[str, str, str], int],
        stamps: dict[str, list[int]],
        erased: list[DeadLetter],
    ) -> None:
        """After COMMIT: move our offsets and mirror them to Kafka, count, observe latency
        (Kafka timestamp → now). `erased`: the dead letters of erased keys skipped before the
        transaction; those it found (`result.erased_letters`) were not stored either."""
        now = time.time()
        for table, skipped in result.suppressed.items():
            self.metrics.erasure_suppressed.labels(table, STREAM).inc(skipped)
        stored = [d for d in batch.dead_letters if d not in result.erased_letters]
        erased = [*erased, *result.erased_letters]
        for letter in erased:
            self._erased.discard(_position(letter))
            self._dlq_sent.pop(_position(letter), None)
            assert letter.row is not None
            self.metrics.erasure_suppressed.labels(letter.row[0].target, DEAD_LETTER).inc()
            log.info(
                "dead_letter_erased",  # no key: it names an erased person
                topic=letter.topic,
                partition=letter.partition,
                offset=letter.offset,
                table=letter.row[0].target,
                stage=letter.stage,
                error_class=letter.error_class,
            )
        for move in batch.checkpoints:
            tp = TopicPartition(move.topic, move.partition)
            if tp in self.owned:
                self.owned[tp].next_offset = move.next_offset
            self.metrics.last_commit_timestamp.labels(move.topic, str(move.partition)).set(now)
        assert self.offsets is not None
        self.offsets.mirror(batch.checkpoints)  # also a refused record's move: lag tools see it
        for letter in stored:
            self._dlq_sent.pop(_position(letter), None)
            self.limiter.record(letter.topic, letter.partition, letter.offsets(self.limiter.window))
            self.metrics.dlq_records.labels(letter.topic, letter.error_class).inc()
            if not letter.payload_in_topic:
                self.metrics.dlq_oversized_records.labels(letter.topic).inc()
            log.warning(
                "dead_lettered",
                topic=letter.topic,
                partition=letter.partition,
                offset=letter.offset,
                stage=letter.stage,
                error_class=letter.error_class,
                error=letter.message,
                schema_id=letter.schema_id,
                dlq_id=letter.dlq_id,
                # False: too large for the DLQ topic, the record is in _cdc_dlq_records only
                payload_in_topic=letter.payload_in_topic,
            )
        rows = sum(counts.values())
        self.applied_events += rows + len(stored) + len(erased)
        for (topic, table, op), n in counts.items():  # one increment per op, not per event
            self.metrics.events_processed.labels(topic, table, op).inc(n)
        self.metrics.batch_size.observe(rows)
        for table, kafka_ms in stamps.items():
            observe_all(
                self.metrics.processing_latency.labels(table),
                (max(0.0, now - stamp / 1000) for stamp in kafka_ms),
            )
        if batch.checkpoints:  # one line for the transaction, however many partitions it moved
            log.info(
                "batch_committed",
                partitions=[
                    {
                        "topic": move.topic,
                        "partition": move.partition,
                        "first_offset": move.expected,
                        "next_offset": move.next_offset,
                    }
                    for move in batch.checkpoints
                ],
                rows=rows,
                dead_letters=len(stored),
                duration_ms=round(result.duration_s * 1000, 1),
            )


def _position(letter: DeadLetter) -> tuple[str, int, int]:
    return letter.topic, letter.partition, letter.offset
