"""The dead-letter queue: records that cannot be applied, kept with why they failed.

A dead letter is produced to the DLQ topic (acks=all, awaited) before the transaction that
records it in `_cdc_dlq_records` and moves the checkpoint past it, so the offset never moves
past a record that is in neither PostgreSQL nor the DLQ. `DlqLimiter` stops a bad deploy from
quietly dead-lettering a whole table: past its share the partition pauses instead.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
)

from cdc_sink.errors import FatalError, TransientError

Header = tuple[str, bytes | None]  # Kafka allows a header without a value


@dataclass(frozen=True)
class DeadLetter:
    """A record that could not be applied, with where it came from and why."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    error_class: str
    message: str
    stage: str
    schema_id: int | None
    failed_at: dt.datetime


def dlq_headers(letter: DeadLetter, consumer_group: str) -> list[Header]:
    """The record's own headers followed by the error context (all values UTF-8 text)."""
    context = {
        "cdc.error.class": letter.error_class,
        "cdc.error.message": letter.message,
        "cdc.error.stage": letter.stage,
        "cdc.source.topic": letter.topic,
        "cdc.source.partition": str(letter.partition),
        "cdc.source.offset": str(letter.offset),
        "cdc.source.timestamp": "" if letter.timestamp_ms is None else str(letter.timestamp_ms),
        "cdc.schema.id": "" if letter.schema_id is None else str(letter.schema_id),
        "cdc.failed.at": letter.failed_at.isoformat(),
        "cdc.consumer.group": consumer_group,
    }
    return [*letter.headers, *((k, v.encode()) for k, v in context.items())]


def headers_to_json(headers: Sequence[Header]) -> str:
    """Headers as JSON for `_cdc_dlq_records`: text stays readable, other bytes as base64."""
    out: list[dict[str, str | None]] = []
    for key, value in headers:
        if value is None:
            out.append({"key": key, "value": None})
            continue
        try:
            out.append({"key": key, "value": value.decode("utf-8")})
        except UnicodeDecodeError:
            out.append({"key": key, "base64": base64.b64encode(value).decode()})
    return json.dumps(out)


def headers_from_json(stored: Any) -> list[Header]:
    """The inverse of `headers_to_json` (accepts the decoded JSON or its text)."""
    items = json.loads(stored) if isinstance(stored, str) else stored
    return [(item["key"], _header_value(item)) for item in items]


def _header_value(item: dict[str, Any]) -> bytes | None:
    if "base64" in item:
        return base64.b64decode(item["base64"])
    text = item["value"]
    return None if text is None else text.encode()


class DlqLimiter:
    """Allows at most `max_share` of a partition's last `window` offsets to be dead-lettered.

    Pure bookkeeping: the runner asks `admits` before dead-lettering and calls `record` after
    the commit. A share of 1 or more never trips.
    """

    def __init__(self, max_share: float, window: int) -> None:
        self.window = window
        self.limit = int(max_share * window)
        self.enabled = max_share < 1
        self._dead: dict[tuple[str, int], collections.deque[int]] = {}

    def admits(self, topic: str, partition: int, offsets: Sequence[int], last_offset: int) -> bool:
        """Whether dead-lettering `offsets` keeps the partition within its share, counting the
        dead letters among the `window` offsets ending at `last_offset`."""
        if not self.enabled or not offsets:
            return True
        floor = last_offset - self.window
        recent = self._dead.get((topic, partition), ())
        return sum(o > floor for o in recent) + sum(o > floor for o in offsets) <= self.limit

    def record(self, topic: str, partition: int, offsets: Sequence[int]) -> None:
        if not self.enabled or not offsets:
            return
        dead = self._dead.setdefault((topic, partition), collections.deque())
        dead.extend(offsets)
        while dead and dead[0] <= dead[-1] - self.window:
            dead.popleft()

    def forget(self, topic: str, partition: int) -> None:
        self._dead.pop((topic, partition), None)


def kafka_failure(exc: KafkaError, doing: str) -> Exception:
    """A Kafka client error as the sink's kind: timeouts and retriable errors are transient,
    the rest (authorization, message too large, …) fatal."""
    if isinstance(exc, KafkaTimeoutError | KafkaConnectionError) or exc.retriable:
        return TransientError(f"{doing}: {type(exc).__name__}: {exc}")
    return FatalError(f"{doing}: {type(exc).__name__}: {exc}; nothing was committed")


class DlqProducer:
    """Produces to Kafka with acks=all: dead letters to the DLQ topic, replays to their
    original topic. One per worker (or per CLI command)."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        partitions: int = 1,
        replication_factor: int = 0,
        client_id: str = "cdc-sink-dlq",
        security: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.partitions = partitions
        self.replication_factor = replication_factor
        self._security = dict(security or {})  # kafka_security.client_security
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=30_000,
            **self._security,
        )
        self._topic_ready = False

    async def start(self) -> None:
        """Connect; raise KafkaError if Kafka cannot be reached (nothing left open)."""
        try:
            await self._producer.start()
        except KafkaError:
            await self._producer.stop()
            raise

    async def stop(self) -> None:
        await self._producer.stop()

    async def send_letters(self, letters: Sequence[DeadLetter], consumer_group: str) -> None:
        """Produce every letter to the DLQ topic and wait until each is acknowledged by all
        in-sync replicas. Raises TransientError or FatalError; may be called again with the
        same letters (the table side is idempotent, the topic may then hold a duplicate)."""
        if not letters:
            return
        await self._ensure_topic()
        records = [
            (self.topic, None, letter.key, letter.value, dlq_headers(letter, consumer_group))
            for letter in letters
        ]
        await self._send_all(records, f"producing to the DLQ topic {self.topic!r}")

    async def send_replays(
        self, records: Sequence[tuple[str, int, bytes | None, bytes | None, list[Header]]]
    ) -> None:
        """Produce (topic, partition, key, value, headers) records and await every ack."""
        await self._send_all(records, "replaying dead letters")

    async def _send_all(
        self,
        records: Sequence[tuple[str, int | None, bytes | None, bytes | None, list[Header]]],
        doing: str,
    ) -> None:
        try:
            sent = [
                await self._producer.send(
                    topic, value, key=key, partition=partition, headers=headers
                )
                for topic, partition, key, value, headers in records
            ]
            await asyncio.gather(*sent)
        except KafkaError as exc:
            raise kafka_failure(exc, doing) from exc

    async def _ensure_topic(self) -> None:
        """Create the DLQ topic once if it does not exist (brokers may not auto-create)."""
        if self._topic_ready:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, **self._security)
        try:
            await admin.start()
            replicas = self.replication_factor
            if replicas <= 0:  # as many copies as the cluster allows, up to three
                replicas = min(3, len((await admin.describe_cluster())["brokers"]))
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(self.topic, self.partitions, replicas)])
        except KafkaError as exc:
            raise kafka_failure(exc, f"creating the DLQ topic {self.topic!r}") from exc
        finally:
            await admin.close()
        self._topic_ready = True
