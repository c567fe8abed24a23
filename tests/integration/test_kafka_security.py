"""The worker on the stack's secured Kafka listeners (SASL PLAIN or SCRAM-SHA-512 over TLS, and
mutual TLS), as managed clusters require."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from cdc_sink.errors import FatalError
from tests.support.cassandra_model import Mutation
from tests.support.names import Unique
from tests.support.pipeline import (
    create_cassandra_model_table,
    create_topic,
    produce,
    read_rows,
    run_cli,
    run_worker,
    schemaless_record,
    sink_env,
)
from tests.support.stack import Endpoints


def secured(stack: Endpoints, **changes: str) -> dict[str, str]:
    """Settings that reach the stack's Kafka only through its SASL_SSL listener."""
    return {
        "CDC_KAFKA__BOOTSTRAP_SERVERS": stack["CDC_STACK_KAFKA_SECURED"],
        "CDC_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "CDC_KAFKA__SASL_MECHANISM": "PLAIN",
        "CDC_KAFKA__SASL_USERNAME": stack["CDC_STACK_KAFKA_SASL_USERNAME"],
        "CDC_KAFKA__SASL_PASSWORD": stack["CDC_STACK_KAFKA_SASL_PASSWORD"],
        "CDC_KAFKA__SSL_CAFILE": stack["CDC_STACK_KAFKA_CAFILE"],
        **changes,
    }


def mutual_tls(stack: Endpoints, **changes: str) -> dict[str, str]:
    """Settings that reach the stack's Kafka through its SSL listener with a client certificate."""
    return {
        "CDC_KAFKA__BOOTSTRAP_SERVERS": stack["CDC_STACK_KAFKA_MTLS"],
        "CDC_KAFKA__SECURITY_PROTOCOL": "SSL",
        "CDC_KAFKA__SSL_CAFILE": stack["CDC_STACK_CA_FILE"],
        "CDC_KAFKA__SSL_CERTFILE": stack["CDC_STACK_CLIENT_CERTFILE"],
        "CDC_KAFKA__SSL_KEYFILE": stack["CDC_STACK_CLIENT_KEYFILE"],
        **changes,
    }


@pytest.mark.parametrize(
    "security",
    [
        pytest.param(secured, id="sasl-plain"),
        pytest.param(lambda s: secured(s, CDC_KAFKA__SASL_MECHANISM="SCRAM-SHA-512"), id="scram"),
        pytest.param(mutual_tls, id="mutual-tls"),
    ],
)
async def test_the_worker_consumes_and_dead_letters_over_tls(
    stack: Endpoints, unique: Unique, security: Callable[[Endpoints], dict[str, str]]
) -> None:
    """Consumer, DLQ topic creation and DLQ producer all go through the secured listener:
    SASL PLAIN or SCRAM-SHA-512 (a user made with kafka-configs) over TLS, or mutual TLS."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("secured")
    topic = unique("cdc-events-secured")
    dlq_topic = unique("dlq-events")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, 2)
    rows = [Mutation("insert", 1_000 + i, (0, "a", i, "x"), {"v1": (i, None)}) for i in range(20)]
    records = [schemaless_record(m, keyspace) for m in rows]
    records.insert(7, (b'{"p1": 0}', b"\xff not an event"))
    await produce(stack.kafka, topic, records)
    env = {
        **sink_env(stack, topic=topic, group=unique("g"), schema=schema, dlq__topic=dlq_topic),
        **security(stack),
    }
    worker = await run_worker(env)
    assert worker.applied_events == len(records)
    stored = await read_rows(stack.postgres_dsn, schema, "cdc_model", ("v1",))
    assert stored == {m.key: {"v1": m.cells["v1"][0]} for m in rows}
    listed = await asyncio.to_thread(run_cli, env, "dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 1


NOBODY = {
    "CDC_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
    "CDC_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT",
}


@pytest.mark.parametrize(
    ("changes", "settings", "reason"),
    [
        ({"CDC_KAFKA__SASL_PASSWORD": "wrong"}, "SASL_SSL and its settings", "Authentication"),
        (
            {"CDC_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512", "CDC_KAFKA__SASL_PASSWORD": "wrong"},
            "SASL_SSL and its settings",
            "Authentication",
        ),
        (
            {"CDC_KAFKA__SSL_CAFILE": "/etc/ssl/certs/ca-certificates.crt"},
            "SASL_SSL and its settings",
            "CERTIFICATE_VERIFY_FAILED",
        ),
        (NOBODY, r"\(CDC_KAFKA__BOOTSTRAP_SERVERS\)", "Connect call failed"),
    ],
)
async def test_refused_credentials_stop_the_worker_saying_where_to_look(
    stack: Endpoints,
    unique: Unique,
    changes: dict[str, str],
    settings: str,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong password, an untrusted certificate or no broker at all: exit with a message
    naming the settings, after aiokafka's error line giving the reason."""
    caplog.set_level(logging.INFO, logger="aiokafka")  # whatever the process set it to
    topic, schema = unique("cdc-events-refused"), unique.schema("refused")
    env = {**sink_env(stack, topic=topic, group=unique("g"), schema=schema), **secured(stack)}
    env.update(changes)
    with pytest.raises(FatalError, match=f"cannot reach Kafka for the DLQ producer.*{settings}"):
        await run_worker(env)
    assert reason in caplog.text


async def test_the_mutual_tls_listener_refuses_a_client_without_certificate(
    stack: Endpoints, unique: Unique
) -> None:
    """Without CDC_KAFKA__SSL_CERTFILE the broker ends the handshake: the worker stops saying
    which settings to check."""
    topic, schema = unique("cdc-events-nocert"), unique.schema("nocert")
    env = {**sink_env(stack, topic=topic, group=unique("g"), schema=schema), **mutual_tls(stack)}
    del env["CDC_KAFKA__SSL_CERTFILE"], env["CDC_KAFKA__SSL_KEYFILE"]
    with pytest.raises(FatalError, match="SECURITY_PROTOCOL=SSL and its settings"):
        await run_worker(env)
