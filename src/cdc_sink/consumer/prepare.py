"""The record preparer: Kafka records → decode → interpret → resolve the table → convert, into
a Prepared chunk the applier writes. Each record is decoded once: the parts a chunk is split
into (bisection, a partition moved by a rebalance) are regrouped from what was prepared."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import TopicPartition

from cdc_sink.apply.suppression import record_key
from cdc_sink.apply.writer import Batch
from cdc_sink.consumer.compression import UninflatedBatch
from cdc_sink.decode.decoder import DecodedRecord, Decoder
from cdc_sink.decode.nesting import MAX_NESTING, deeper_than
from cdc_sink.dlq.letters import DeadLetter
from cdc_sink.errors import ConversionError, EventError, PoisonError, UnexpectedError
from cdc_sink.failures import Kind, classify, refused
from cdc_sink.model.events import Key, Mutation, Position, interpret, op_name
from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.metrics import Metrics
from cdc_sink.retry import RetryPolicy
from cdc_sink.schema.catalog import Catalog
from cdc_sink.schema.direct import direct_mutation
from cdc_sink.schema.tables import TableSchema

log = get_logger("cdc_sink.runner")

# While a chunk is in flight, preparing the next one yields to the loop this often: each of
# the transaction's round trips to PostgreSQL waits at most about this long to be read.
PREPARE_YIELD_S = 0.0001

# A record converted: its mutation, table and op name (as cdc_events_processed_total counts it).
Converted = tuple[Mutation, TableSchema, str]
# What became of one record: converted, its dead letter, or None (a tombstone).
Outcome = Converted | DeadLetter | None


@dataclass
class Prepared:
    """A chunk of records turned into a Batch (without checkpoint moves yet); `outcomes` holds
    each record's outcome, in the order of `records`."""

    records: list[Any]
    outcomes: list[Outcome] = field(default_factory=list)
    batch: Batch = field(default_factory=Batch)
    # (topic, table, op name) -> events, counted once committed
    counts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    stamps: dict[str, list[int]] = field(default_factory=dict)  # table -> Kafka timestamps
    first: dict[TopicPartition, int] = field(default_factory=dict)
    last: dict[TopicPartition, int] = field(default_factory=dict)
    began_ns: int = 0  # when preparing its first record began (epoch ns, for its trace span)
    ready_ns: int = 0  # when its last record was prepared

    @classmethod
    def of(
        cls, records: list[Any], outcomes: list[Outcome], began_ns: int, ready_ns: int
    ) -> Prepared:
        """Group the records' outcomes by table (in record order) into a batch."""
        prepared = cls(records, outcomes, began_ns=began_ns, ready_ns=ready_ns)
        per_table: dict[str, tuple[TableSchema, list[Mutation]]] = {}
        first, last, counts = prepared.first, prepared.last, prepared.counts
        stamps = prepared.stamps
        tp = None
        for record, outcome in zip(records, outcomes, strict=True):
            # A chunk holds runs of one partition: a TopicPartition per run, not per record.
            if tp is None or record.partition != tp.partition or record.topic != tp.topic:
                tp = TopicPartition(record.topic, record.partition)
                first.setdefault(tp, record.offset)
            last[tp] = record.offset
            if outcome is None:
                continue
            if isinstance(outcome, DeadLetter):
                prepared.batch.dead_letters.append(outcome)
                continue
            converted, schema, op = outcome
            target = schema.target
            entry = per_table.get(target)
            if entry is None:
                entry = per_table[target] = (schema, [])
                stamps[target] = []
            elif entry[0].version != schema.version:  # the table grew a column mid-batch
                entry = per_table[target] = (schema, entry[1])
            entry[1].append(converted)
            stamps[target].append(record.timestamp)
            key = (record.topic, target, op)
            counts[key] = counts.get(key, 0) + 1
        prepared.batch.tables = list(per_table.values())
        return prepared

    def part(self, keep: Callable[[Any], bool]) -> Prepared:
        """The records `keep` accepts, regrouped without preparing them again."""
        kept = [(r, o) for r, o in zip(self.records, self.outcomes, strict=True) if keep(r)]
        return self._regroup([r for r, _ in kept], [o for _, o in kept])

    def halves(self) -> tuple[Prepared, Prepared]:
        """The first and second half of the records (for bisection), each regrouped."""
        middle = len(self.records) // 2
        return (
            self._regroup(self.records[:middle], self.outcomes[:middle]),
            self._regroup(self.records[middle:], self.outcomes[middle:]),
        )

    def _regroup(self, records: list[Any], outcomes: list[Outcome]) -> Prepared:
        return Prepared.of(records, outcomes, self.began_ns, self.ready_ns)

    @staticmethod
    def joined(pieces: Sequence[Prepared]) -> Prepared:
        """Chunks prepared one after the other (each one's records follow the earlier ones'
        per partition) as one, regrouped once: a table's newest schema applies to them all."""
        if len(pieces) == 1:
            return pieces[0]
        records = [r for piece in pieces for r in piece.records]
        outcomes = [o for piece in pieces for o in piece.outcomes]
        return Prepared.of(records, outcomes, pieces[0].began_ns, pieces[-1].ready_ns)

    def trace_attributes(self) -> dict[str, Any]:
        """What a `cdc.batch` span records of this chunk."""
        return {
            "messaging.system": "kafka",
            "cdc.records": len(self.records),
            "cdc.rows": sum(self.counts.values()),
            "cdc.dead_letters": len(self.batch.dead_letters),
            "cdc.tables": [schema.target for schema, _ in self.batch.tables],
            # topic[partition]:first..last, offsets inclusive
            "cdc.offsets": [
                f"{tp.topic}[{tp.partition}]:{first}..{self.last[tp]}"
                for tp, first in self.first.items()
            ],
        }


@dataclass
class Preparer:
    """Prepares chunks of records; poison becomes dead letters (counted in cdc_errors_total),
    an unreachable registry or catalog is waited for with `retry` (never dead-lettered)."""

    decoder: Decoder
    catalog: Catalog
    metrics: Metrics
    retry: RetryPolicy
    stopping: asyncio.Event

    async def prepare(self, records: list[Any], busy: Callable[[], bool]) -> Prepared:
        """Decode, interpret and convert records (DDL as needed), yielding to the loop now and
        then while `busy()` (a chunk in flight waits on PostgreSQL's answers). Raises what
        no record is to blame for: FatalError, Stopping, MemoryError."""
        began_ns = time.time_ns()
        outcomes: list[Outcome] = []
        # Schemas new to this worker are asked for together: an id the registry does not know
        # yet then holds the chunk once, not once for each record that carries one.
        await self.decoder.prefetch(part for r in records for part in (r.key, r.value))
        next_yield = time.perf_counter() + PREPARE_YIELD_S
        for record in records:
            if time.perf_counter() >= next_yield and busy():
                await asyncio.sleep(0)  # let the chunk in flight go on with PostgreSQL's answers
                next_yield = time.perf_counter() + PREPARE_YIELD_S
            decoded: DecodedRecord | None = None
            try:
                try:
                    decoded = await self._decode(record)
                    outcome: Outcome = await self._convert(record, decoded)
                except Exception as exc:
                    if classify(exc) is not Kind.TRANSIENT:  # poison is handled below
                        raise
                    # The registry or the catalog is unreachable: wait for it, never DLQ.
                    step = functools.partial(self._to_mutation, record)
                    outcome = await self.retry.run(
                        "decode", step, stopping=self.stopping, metrics=self.metrics
                    )
            except PoisonError as exc:
                row = None if decoded is None else self._row_of(decoded)
                outcome = dead_letter(record, exc, exc.stage, row)
                self.metrics.errors.labels(exc.stage, "poison").inc()
            except asyncpg.PostgresError as exc:  # not transient: e.g. a privilege missing
                raise refused("reading or recording a table's schema", exc, "catalog") from exc
            outcomes.append(outcome)
        return Prepared.of(records, outcomes, began_ns, time.time_ns())

    def _row_of(self, decoded: DecodedRecord) -> tuple[TableSchema, Key] | None:
        """The table and key of a decoded record that failed, when its value names a table
        this worker knows (then an erased key is not dead-lettered); else None."""
        source = decoded.value.get("source") if isinstance(decoded.value, dict) else None
        if not isinstance(source, dict):
            return None
        schema = self.catalog.known(str(source.get("keyspace")), str(source.get("table")))
        if schema is None:
            return None
        key = record_key(schema, decoded.key)
        return None if key is None else (schema, key)

    async def _to_mutation(self, record: Any) -> Converted | None:
        return await self._convert(record, await self._decode(record))

    async def _decode(self, record: Any) -> DecodedRecord:
        if isinstance(record.value, UninflatedBatch):
            raise record.value.error()
        return await self.decoder.decode(record.key, record.value)

    async def _convert(self, record: Any, decoded: DecodedRecord) -> Converted | None:
        if decoded.value is None:
            return None  # a Kafka tombstone following a delete: nothing to apply
        position = Position(record.topic, record.partition, record.offset)
        converted = direct_mutation(self.catalog.known, decoded.key, decoded.value, position)
        if converted is not None:
            return converted
        try:
            event = interpret(decoded.key, decoded.value, position)
        except (PoisonError, MemoryError):
            raise
        except Exception as exc:
            raise _unforeseen(record, decoded, exc, "interpret") from exc
        schema = await self.catalog.resolve(event, decoded.key_schema, decoded.column_schemas)
        try:
            mutation = schema.to_mutation(event)
        except (PoisonError, MemoryError):
            raise
        except Exception as exc:
            raise _unforeseen(record, decoded, exc, "convert") from exc
        return mutation, schema, op_name(event)


_STAGE_POISON = {"interpret": EventError, "convert": ConversionError}


def _unforeseen(record: Any, decoded: DecodedRecord, exc: Exception, stage: str) -> PoisonError:
    """What a pure stage's unforeseen failure on a record is: the record's own fault when the
    stage ran out of stack on values nesting deeper than MAX_NESTING (JSON parses up to about
    the stack's depth, and printing or walking such values recurses); otherwise a defect,
    logged with its traceback, for which only this record is dead-lettered (replay it once
    fixed; the DLQ limit pauses the partition if every record fails so)."""
    if isinstance(exc, RecursionError) and (deeper_than(decoded.key) or deeper_than(decoded.value)):
        return _STAGE_POISON[stage](f"the record nests deeper than {MAX_NESTING} levels")
    log.error(
        "unexpected_record_error",
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        stage=stage,
        exc_info=exc,
    )
    return UnexpectedError(f"{type(exc).__name__}: {exc}", stage=stage)


def dead_letter(
    record: Any, exc: BaseException, stage: str, row: tuple[TableSchema, Key] | None = None
) -> DeadLetter:
    """The dead letter of a record: its bytes as read, where and why it failed, and its table
    and key when known."""
    unread = record.value if isinstance(record.value, UninflatedBatch) else None
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp,
        key=record.key,
        # None of its bytes were read (and Kafka takes no record without a key or a value).
        value=b"" if unread is not None else record.value,
        headers=tuple((k, None if v is None else bytes(v)) for k, v in (record.headers or ())),
        error_class=type(exc).__name__,
        message=str(exc)[:2000],
        stage=stage,
        schema_id=None if unread is not None else _schema_id(record.value),
        failed_at=dt.datetime.now(dt.UTC),
        first_offset=None if unread is None else unread.first_offset,
        row=row,
    )


def _schema_id(value: bytes | None) -> int | None:
    """The Confluent header's schema id, read as the decoder reads it: a signed 32-bit int, as
    `_cdc_dlq_records.schema_id` stores it."""
    if value and len(value) >= 5 and value[0] == 0:
        return int.from_bytes(value[1:5], "big", signed=True)
    return None
