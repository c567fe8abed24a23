"""How every Kafka client of the sink reaches the cluster: TLS and SASL from the settings."""

from __future__ import annotations

from typing import Any

from cdc_sink.config import KafkaConfig
from cdc_sink.errors import FatalError
from cdc_sink.ops.tls import client_context


def client_security(kafka: KafkaConfig) -> dict[str, Any]:
    """aiokafka keyword arguments for `kafka`'s security settings (none but the protocol for
    PLAINTEXT). SCRAM takes its credentials through the same `sasl_plain_*` arguments."""
    options: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = client_context(
            "CDC_KAFKA__SSL_CAFILE", kafka.ssl_cafile, kafka.ssl_certfile, kafka.ssl_keyfile
        )
    if kafka.security_protocol.startswith("SASL_"):
        assert kafka.sasl_password is not None  # KafkaConfig.validate
        options.update(
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_plain_username=kafka.sasl_username,
            sasl_plain_password=kafka.sasl_password.reveal(),
        )
    return options


def unreachable(kafka: KafkaConfig, client: str, exc: BaseException) -> FatalError:
    """The error for a client that could not connect. aiokafka raises only "Unable to
    bootstrap"; the broker's reason (refused connection, failed authentication, untrusted
    certificate) is in the error it logs just before."""
    settings = "CDC_KAFKA__BOOTSTRAP_SERVERS"
    if kafka.security_protocol != "PLAINTEXT":
        settings += f", CDC_KAFKA__SECURITY_PROTOCOL={kafka.security_protocol} and its settings"
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        # aiokafka does not say why; an untrusted broker certificate is a common reason
        trusted = kafka.ssl_cafile or "the system's trusted CAs"
        settings += (
            f"; CDC_KAFKA__SSL_CAFILE ({trusted}) must hold the CA of the broker's certificate"
        )
    return FatalError(
        f"cannot reach Kafka for the {client} ({settings}): {exc}; "
        "the reason is in aiokafka's error just before",
        stage="kafka",
    )
