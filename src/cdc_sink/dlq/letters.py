"""The dead-letter queue: records that cannot be applied, kept with why they failed.

A dead letter is produced to the DLQ topic (acks=all, awaited) before the transaction that
records it in `_cdc_dlq_records` and moves the checkpoint past it, so the offset never moves
past a record that is in neither PostgreSQL nor the DLQ. `DlqLimiter` stops a bad deploy from
quietly dead-lettering a whole table: past its share the partition pauses instead.

Any record Kafka delivered can be dead-lettered, however large: each message is checked against
its destination topic's `max.message.bytes` (the sink makes the DLQ topic as large as its
sources allow). A dead letter too large for the DLQ topic is produced without its record,
with headers naming the `_cdc_dlq_records` row that keeps it whole.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    for_code,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from cdc_sink.errors import FatalError, TransientError
from cdc_sink.ops.logs import get_logger

log = get_logger("cdc_sink.dlq")

Header = tuple[str, bytes | None]  # Kafka allows a header without a value
Message = tuple[bytes | None, bytes | None, list[Header]]  # key, value, headers

# Kafka's default `max.message.bytes`: assumed for a topic whose settings may not be read.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# Room a DLQ topic the sink makes leaves above its sources' limit for the error context.
CONTEXT_HEADROOM_BYTES = 64 * 1024
# aiokafka checks every record against one limit for all topics; the sink checks each against
# its own topic's `max.message.bytes` before sending (`message_bytes`), so the client's is moot.
PRODUCER_MAX_REQUEST_BYTES = 2**31 - 1
_DENIED = (TopicAuthorizationFailedError.errno, ClusterAuthorizationFailedError.errno)


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
    dlq_id: int | None = None  # its `_cdc_dlq_records` row, reserved before it is produced
    payload_in_topic: bool = True  # False: too large, its DLQ message carries the context only
    # A letter for a whole record batch that could not be read: its first offset (`offset` is
    # its last).
    first_offset: int | None = None

    def offsets(self, window: int) -> range:
        """The offsets this letter stands for, at most the last `window` of them."""
        first = self.offset if self.first_offset is None else self.first_offset
        return range(max(first, self.offset - window + 1), self.offset + 1)


def dlq_headers(letter: DeadLetter, consumer_group: str) -> list[Header]:
    """The record's own headers followed by the error context (all values UTF-8 text)."""
    return [*letter.headers, *context_headers(letter, consumer_group)]


def context_headers(letter: DeadLetter, consumer_group: str) -> list[Header]:
    """Why and where the record failed; `cdc.dlq.id` once its row is reserved."""
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
    if letter.dlq_id is not None:
        context["cdc.dlq.id"] = str(letter.dlq_id)
    return [(k, v.encode()) for k, v in context.items()]


def message_bytes(key: bytes | None, value: bytes | None, headers: Sequence[Header]) -> int:
    """The most a message takes in a record batch of its own: what the broker compares with
    the topic's `max.message.bytes` (the sink sends uncompressed)."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)))


def dlq_message(letter: DeadLetter, consumer_group: str, max_bytes: int) -> tuple[Message, bool]:
    """What the DLQ topic receives for `letter`, and whether it carries the record.

    The record (key, value, own headers) with the error context if that fits `max_bytes`, the
    topic's `max.message.bytes`; else no key, an empty value (Kafka wants one of the two) and
    the context plus `cdc.payload.stored: postgres` and `cdc.payload.bytes` (the size that did
    not fit): the record is then only in its `_cdc_dlq_records` row (`cdc.dlq.id`). Raises
    FatalError if not even the context fits."""
    whole = dlq_headers(letter, consumer_group)
    size = message_bytes(letter.key, letter.value, whole)
    if size <= max_bytes:
        return (letter.key, letter.value, whole), True
    context = [
        *context_headers(letter, consumer_group),
        ("cdc.payload.stored", b"postgres"),
        ("cdc.payload.bytes", str(size).encode()),
    ]
    if message_bytes(None, b"", context) > max_bytes:
        raise FatalError(
            f"the DLQ topic's max.message.bytes ({max_bytes}) is too small even for a dead "
            "letter's error context; raise it (64 KiB or more)"
        )
    return (None, b"", context), False


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
    return FatalError(f"{doing}: {type(exc).__name__}: {exc}; nothing was committed", stage="dlq")


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
            max_request_size=PRODUCER_MAX_REQUEST_BYTES,
            **self._security,
        )
        self._topic_limit: int | None = None  # the DLQ topic's max.message.bytes, once known

    async def start(self) -> None:
        """Connect; raise KafkaError if Kafka cannot be reached (nothing left open)."""
        try:
            await self._producer.start()
        except KafkaError:
            await self._producer.stop()
            raise

    async def stop(self) -> None:
        await self._producer.stop()

    async def send_letters(
        self, letters: Sequence[DeadLetter], consumer_group: str
    ) -> list[DeadLetter]:
        """Produce every letter to the DLQ topic and wait until each is acknowledged by all
        in-sync replicas; return the letters as sent (`payload_in_topic` False for those too
        large for the topic: see `dlq_message`). Raises TransientError or FatalError; may be
        called again with the same letters (the table side is idempotent, the topic may then
        hold a duplicate)."""
        if not letters:
            return []
        limit = await self._ensure_topic({letter.topic for letter in letters})
        messages = [dlq_message(letter, consumer_group, limit) for letter in letters]
        await self._send_all(
            [(self.topic, None, *message) for message, _ in messages],
            f"producing to the DLQ topic {self.topic!r}",
        )
        return [
            letter if whole else dataclasses.replace(letter, payload_in_topic=False)
            for letter, (_, whole) in zip(letters, messages, strict=True)
        ]

    async def send_replays(
        self, records: Sequence[tuple[str, int, bytes | None, bytes | None, list[Header]]]
    ) -> None:
        """Produce (topic, partition, key, value, headers) records and await every ack.
        Raises FatalError, sending nothing, if one is larger than its topic's
        `max.message.bytes` (lowered since, or the record came compressed)."""
        if not records:
            return
        doing = "replaying dead letters"
        async with self._admin(doing) as admin:
            limits = await topic_limits(admin, {topic for topic, *_ in records})
        for topic, _, key, value, headers in records:
            size = message_bytes(key, value, headers)
            limit = limits.get(topic, KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
            if size > limit:
                raise FatalError(
                    f"{doing}: a record of {size} bytes is larger than {topic!r} takes "
                    f"(max.message.bytes {limit}); nothing was sent"
                )
        await self._send_all(records, doing)

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

    async def _ensure_topic(self, sources: set[str]) -> int:
        """The DLQ topic's `max.message.bytes`, read once. A missing topic is created (brokers
        may not auto-create) taking as much as the largest of `sources`, the dead letters'
        topics, plus room for the error context."""
        if self._topic_limit is not None:
            return self._topic_limit
        doing = f"reading or creating the DLQ topic {self.topic!r}"
        async with self._admin(doing) as admin:
            known = await topic_limits(admin, {self.topic, *sources})
            limit = known.get(self.topic) or await self._create_topic(admin, known, sources)
        self._topic_limit = limit
        return limit

    async def _create_topic(
        self, admin: AIOKafkaAdminClient, known: Mapping[str, int], sources: set[str]
    ) -> int:
        """Create the DLQ topic taking what the broker and `sources` take, plus the context;
        return its `max.message.bytes`."""
        brokers = (await admin.describe_cluster())["brokers"]
        broker = str(brokers[0]["node_id"])
        resource = ConfigResource(ConfigResourceType.BROKER, broker, {"message.max.bytes": None})
        default = (await config_limits(admin, [resource])).get(broker)
        limit = CONTEXT_HEADROOM_BYTES + max(
            default or KAFKA_DEFAULT_MAX_MESSAGE_BYTES, *(known.get(s, 0) for s in sources)
        )
        replicas = self.replication_factor
        if replicas <= 0:  # as many copies as the cluster allows, up to three
            replicas = min(3, len(brokers))
        config = {"max.message.bytes": str(limit)}
        response = await admin.create_topics(
            [NewTopic(self.topic, self.partitions, replicas, topic_configs=config)]
        )
        [(_, code, *_)] = response.topic_errors
        if code == TopicAlreadyExistsError.errno:  # made meanwhile, by another worker
            return (await topic_limits(admin, {self.topic})).get(
                self.topic, KAFKA_DEFAULT_MAX_MESSAGE_BYTES
            )
        if code in _DENIED:  # it may exist all the same: producing will tell
            log.warning("dlq_topic_not_created", topic=self.topic, error=for_code(code).__name__)
            return KAFKA_DEFAULT_MAX_MESSAGE_BYTES
        if code:
            raise for_code(code)(f"cannot create the DLQ topic {self.topic!r}")
        log.info("dlq_topic_created", topic=self.topic, max_message_bytes=limit)
        return limit

    @contextlib.asynccontextmanager
    async def _admin(self, doing: str) -> AsyncIterator[AIOKafkaAdminClient]:
        """An admin client for one task; its Kafka errors are raised as the sink's kind."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, **self._security)
        try:
            await admin.start()
            yield admin
        except KafkaError as exc:
            raise kafka_failure(exc, doing) from exc
        finally:
            await admin.close()


async def topic_limits(admin: AIOKafkaAdminClient, topics: set[str]) -> dict[str, int]:
    """The `max.message.bytes` of each of `topics` that exists."""
    return await config_limits(
        admin,
        [
            ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})
            for topic in sorted(topics)
        ],
    )


async def config_limits(
    admin: AIOKafkaAdminClient, resources: Sequence[ConfigResource]
) -> dict[str, int]:
    """The one size setting each resource (topic or broker) is asked for, by its name; an
    unknown topic is left out, one whose settings this client may not read counts as Kafka's
    default (logged). Other errors are raised."""
    limits: dict[str, int] = {}
    for response in await admin.describe_configs(list(resources)):
        for code, _, _, name, entries in response.resources:
            if code == UnknownTopicOrPartitionError.errno:
                continue
            if code in _DENIED:
                log.warning("kafka_config_unreadable", resource=name, error=for_code(code).__name__)
                limits[name] = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
                continue
            if code:
                raise for_code(code)(f"cannot read the settings of {name!r}")
            [(_, value, *_)] = entries
            limits[name] = int(value)
    return limits
