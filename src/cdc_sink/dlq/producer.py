"""The DLQ producer: sizes dead letters for the DLQ topic and sends them, acks=all, awaited.

A dead letter is produced before the transaction that records it in `_cdc_dlq_records` and
moves the checkpoint past it, so the offset never moves past a record that is in neither
PostgreSQL nor the DLQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
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

from cdc_sink.dlq.letters import DeadLetter, Header, dlq_message, message_bytes
from cdc_sink.errors import FatalError, TransientError
from cdc_sink.ops.logs import get_logger

log = get_logger("cdc_sink.dlq")

# Kafka's default `max.message.bytes`: assumed for a topic whose settings may not be read.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# Room a DLQ topic the sink makes leaves above its sources' limit for the error context.
CONTEXT_HEADROOM_BYTES = 64 * 1024
# aiokafka checks every record against one limit for all topics; the sink checks each against
# its own topic's `max.message.bytes` before sending (`message_bytes`), so the client's is moot.
PRODUCER_MAX_REQUEST_BYTES = 2**31 - 1
_DENIED = (TopicAuthorizationFailedError.errno, ClusterAuthorizationFailedError.errno)
# topic, partition (None: the producer picks one), key, value, headers
Outgoing = tuple[str, int | None, bytes | None, bytes | None, list[Header]]


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

    async def send_replays(self, records: Sequence[Outgoing]) -> None:
        """Produce records to their topic and partition and await every ack.
        Raises FatalError, sending nothing, if one is larger than its topic's
        `max.message.bytes` (lowered since, or the record came compressed)."""
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

    async def _send_all(self, records: Sequence[Outgoing], doing: str) -> None:
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
        # 0: as many copies as the cluster allows, up to three
        replicas = self.replication_factor or min(3, len(brokers))
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
