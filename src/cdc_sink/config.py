"""Configuration: frozen, typed, validated at start-up, read from the environment in one place.

Every setting is an environment variable `CDC_<SECTION>__<NAME>` (e.g. CDC_KAFKA__GROUP_ID) or
the same key in an optional TOML file (`[kafka] group_id = "…"`) named by CDC_CONFIG_FILE or
`--config`; the environment wins over the file. An invalid value stops start-up with a message
naming the setting.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

S = TypeVar("S")


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


class Secret:
    """A secret value that yields itself only to `reveal()`.

    Not a `str`: concatenation, slicing and string methods fail instead of returning the
    plaintext, and str(), repr(), f-strings, %-formatting, logs and JSON (through str() or
    repr()) show `***`. Equal to another Secret with the same value; true when non-empty.
    """

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds text, not {type(value).__name__}")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """The plaintext: only for handing it to the client library that needs it."""
        return self._value

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Secret cannot be changed")

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return format("***", spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(
            self._value.encode(), other._value.encode()
        )

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "cdc-sink"
    topic_pattern: str = r"^cdc-events-.*"
    client_id: str = "cdc-sink"
    session_timeout_ms: int = 30_000
    max_poll_interval_ms: int = 300_000
    fetch_max_bytes: int = 52_428_800
    # The consumer buffers at most one fetch per partition, and hands all of it over at once:
    # memory grows with assigned partitions x this (x ~4 once records become Python objects).
    max_partition_fetch_bytes: int = 262_144
    # The broker answers a fetch once it has this much (or after fetch_max_wait_ms): fewer,
    # larger fetches under load (each costs the worker CPU), still prompt at low traffic.
    fetch_min_bytes: int = 65_536
    fetch_max_wait_ms: int = 50
    # The most a compressed record batch may inflate to (beyond it the batch is dead-lettered
    # unread); a fetch stops taking batches once those it inflated reach it.
    max_inflated_batch_bytes: int = 67_108_864
    auto_offset_reset: str = "earliest"
    # How the cluster is reached: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL.
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"  # or SCRAM-SHA-256 / SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: str | None = None  # PEM; None: the system's trusted CAs
    ssl_certfile: str | None = None  # PEM client certificate (mutual TLS), with ssl_keyfile
    ssl_keyfile: str | None = None

    def validate(self) -> None:
        try:
            re.compile(self.topic_pattern)
        except re.error as exc:
            raise ConfigError(
                f"CDC_KAFKA__TOPIC_PATTERN is not a regular expression: {exc}"
            ) from None
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise ConfigError("CDC_KAFKA__AUTO_OFFSET_RESET must be earliest or latest")
        if not self.bootstrap_servers.strip():
            raise ConfigError("CDC_KAFKA__BOOTSTRAP_SERVERS is empty")
        if not 1 <= self.fetch_min_bytes <= self.fetch_max_bytes:
            raise ConfigError(
                "CDC_KAFKA__FETCH_MIN_BYTES must be between 1 and CDC_KAFKA__FETCH_MAX_BYTES"
            )
        check_range("CDC_KAFKA__FETCH_MAX_WAIT_MS", self.fetch_max_wait_ms, 0, 10_000)
        if not 1024 <= self.max_partition_fetch_bytes <= self.fetch_max_bytes:
            raise ConfigError(
                "CDC_KAFKA__MAX_PARTITION_FETCH_BYTES must be between 1024 and "
                "CDC_KAFKA__FETCH_MAX_BYTES"
            )
        if self.max_inflated_batch_bytes < 1_048_576:
            raise ConfigError("CDC_KAFKA__MAX_INFLATED_BATCH_BYTES must be >= 1048576 (1 MiB)")
        if self.session_timeout_ms < 1 or self.max_poll_interval_ms < 1:
            raise ConfigError(
                "CDC_KAFKA__SESSION_TIMEOUT_MS and CDC_KAFKA__MAX_POLL_INTERVAL_MS must be >= 1"
            )
        self._validate_security()

    def _validate_security(self) -> None:
        if self.security_protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ConfigError(
                "CDC_KAFKA__SECURITY_PROTOCOL must be one of " + ", ".join(KAFKA_SECURITY_PROTOCOLS)
            )
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism not in KAFKA_SASL_MECHANISMS:
                raise ConfigError(
                    f"CDC_KAFKA__SASL_MECHANISM must be one of {', '.join(KAFKA_SASL_MECHANISMS)}"
                )
            if not self.sasl_username or not self.sasl_password:
                raise ConfigError(
                    f"CDC_KAFKA__SECURITY_PROTOCOL={self.security_protocol} needs "
                    "CDC_KAFKA__SASL_USERNAME and CDC_KAFKA__SASL_PASSWORD"
                )
        check_client_certificate("CDC_KAFKA", self.ssl_certfile, self.ssl_keyfile)
        check_files("CDC_KAFKA", self, "ssl_cafile", "ssl_certfile", "ssl_keyfile")


def check_files(section: str, settings: object, *names: str) -> None:
    """ConfigError naming the first of `names` (attributes of `settings`) that is set to a
    path that is not a readable file."""
    for name in names:
        path = getattr(settings, name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{section}__{name.upper()}: no such file {path!r}")


def check_client_certificate(section: str, certfile: str | None, keyfile: str | None) -> None:
    """ConfigError unless a client certificate and its key are both set or both unset."""
    if (certfile is None) != (keyfile is None):
        raise ConfigError(f"{section}__SSL_CERTFILE and {section}__SSL_KEYFILE go together")


def check_range(setting: str, value: float, low: int, high: int | None = None) -> None:
    """ConfigError unless low <= value (<= high, if given); the message states the bounds."""
    if high is None and not value >= low:
        raise ConfigError(f"{setting} must be >= {low}")
    if high is not None and not low <= value <= high:
        raise ConfigError(f"{setting} must be between {low} and {high}")


def check_positive(setting: str, value: float, high: int | None = None) -> None:
    """ConfigError unless 0 < value (<= high, if given); the message states the bounds."""
    if not (value > 0 and (high is None or value <= high)):
        raise ConfigError(f"{setting} must be > 0" + (f" and <= {high}" if high else ""))


@dataclass(frozen=True)
class SchemaRegistryConfig:
    url: str | None = None  # basic auth may also be given as https://user:secret@host
    timeout_s: float = 10.0
    max_unknown_ids: int = 10_000  # schema ids remembered as refused (least recently used go)
    username: str | None = None  # HTTP basic auth, with password
    password: Secret | None = None
    ssl_cafile: str | None = None  # PEM; None: the system's trusted CAs

    def validate(self) -> None:
        check_http_url("CDC_SCHEMA_REGISTRY__URL", self.url)
        if bool(self.username) != bool(self.password):
            raise ConfigError(
                "CDC_SCHEMA_REGISTRY__USERNAME and CDC_SCHEMA_REGISTRY__PASSWORD go together"
            )
        if self.username and self.url and urlsplit(self.url).username is not None:
            raise ConfigError(
                "CDC_SCHEMA_REGISTRY__USERNAME is set and CDC_SCHEMA_REGISTRY__URL holds a user "
                "too: give the credentials in one place"
            )
        check_files("CDC_SCHEMA_REGISTRY", self, "ssl_cafile")
        check_positive("CDC_SCHEMA_REGISTRY__TIMEOUT_S", self.timeout_s)
        check_range("CDC_SCHEMA_REGISTRY__MAX_UNKNOWN_IDS", self.max_unknown_ids, 1)


def check_http_url(setting: str, url: str | None) -> None:
    """ConfigError unless `url` (if set) is http(s)://host[:port][/path]; the message never
    shows the user and password a URL may carry."""
    if url is None:
        return
    parts = urlsplit(url)
    try:
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number or out of range
        usable = False
    if not usable:
        _, at, host = parts.netloc.rpartition("@")
        shown = url.replace(parts.netloc, f"***@{host}", 1) if at else url
        raise ConfigError(f"{setting} must be an http(s)://host[:port][/path] URL, not {shown!r}")


PG_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class PostgresConfig:
    dsn: Secret = field(default_factory=lambda: Secret("postgresql://cdc_sink@127.0.0.1:5432/cdc"))
    schema: str = "public"
    connect_timeout_s: float = 10.0
    role: str | None = None  # SET ROLE after login: the owner of what the sink creates
    # Connections per pod: the writer's own one, plus these pools (see the README's "Sizing").
    pool_size: int = 2  # claims, table look-ups and DDL, housekeeping, readiness
    api_pool_size: int = 2  # the HTTP API's requests
    api_acquire_timeout_s: float = 5.0  # then the request answers 503
    reconciliation_pool_size: int = 4  # jobs: half hold their lock, half run their queries
    # TLS, as libpq names it; None: what the DSN says (its sslmode, default prefer). Use
    # verify-full in production: the others do not check the server's name or certificate.
    sslmode: str | None = None
    sslrootcert: str | None = None  # PEM CA bundle; None: the system's trusted CAs
    sslcert: str | None = None  # PEM client certificate, with sslkey
    sslkey: str | None = None

    def effective_sslmode(self) -> str:
        """The sslmode in force: the setting, else the DSN's, else libpq's default prefer."""
        if self.sslmode is not None:
            return self.sslmode
        return parse_qs(urlsplit(self.dsn.reveal()).query).get("sslmode", ["prefer"])[-1]

    def validate(self) -> None:
        dsn = self.dsn.reveal()
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise ConfigError("CDC_POSTGRES__DSN must be a postgresql:// URL")
        try:  # what asyncpg would otherwise raise as a bare ValueError when connecting
            parts = urlsplit(dsn)
            _ = parts.port
        except ValueError as exc:  # the messages name a part, never the password
            raise ConfigError(f"CDC_POSTGRES__DSN is not a valid URL: {exc}") from None
        query = parse_qs(parts.query)
        sslmode = query.get("sslmode", ["prefer"])[-1]
        if sslmode not in PG_SSLMODES:
            raise ConfigError(f"CDC_POSTGRES__DSN: sslmode must be one of {', '.join(PG_SSLMODES)}")
        self._validate_tls(query)
        if not self.schema or len(self.schema.encode()) > 63:
            raise ConfigError("CDC_POSTGRES__SCHEMA must be 1 to 63 bytes")
        check_positive("CDC_POSTGRES__CONNECT_TIMEOUT_S", self.connect_timeout_s)
        for name, low in (("pool_size", 1), ("api_pool_size", 1), ("reconciliation_pool_size", 2)):
            check_range(f"CDC_POSTGRES__{name.upper()}", getattr(self, name), low, 100)
        check_positive("CDC_POSTGRES__API_ACQUIRE_TIMEOUT_S", self.api_acquire_timeout_s)

    def _validate_tls(self, query: dict[str, list[str]]) -> None:
        if self.sslmode is not None and self.sslmode not in PG_SSLMODES:
            raise ConfigError(f"CDC_POSTGRES__SSLMODE must be one of {', '.join(PG_SSLMODES)}")
        names = ("sslmode", "sslrootcert", "sslcert", "sslkey")
        for name in names:
            if getattr(self, name) is not None and name in query:
                raise ConfigError(
                    f"CDC_POSTGRES__{name.upper()} is set and CDC_POSTGRES__DSN holds {name} "
                    "too: give it in one place"
                )
        if (self.sslcert is None) != (self.sslkey is None):
            raise ConfigError("CDC_POSTGRES__SSLCERT and CDC_POSTGRES__SSLKEY go together")
        if self.sslrootcert and self.effective_sslmode() not in ("verify-ca", "verify-full"):
            # libpq would verify with a root certificate at hand; say what happens instead
            raise ConfigError(
                "CDC_POSTGRES__SSLROOTCERT needs CDC_POSTGRES__SSLMODE verify-ca or verify-full"
            )
        check_files("CDC_POSTGRES", self, *names[1:])


@dataclass(frozen=True)
class SinkConfig:
    batch_size: int = 1000
    linger_ms: int = 200
    table_name_format: str = "cdc_{table}"
    tombstone_grace_seconds: int = 864_000  # Cassandra's default gc_grace_seconds
    expiry_interval_seconds: float = 5.0
    migrate_on_start: bool = True
    retry_attempts: int = 10
    retry_base_seconds: float = 0.1
    retry_max_seconds: float = 60.0
    shutdown_timeout_seconds: float = 30.0

    def validate(self) -> None:
        check_range("CDC_SINK__BATCH_SIZE", self.batch_size, 1, 100_000)
        check_range("CDC_SINK__LINGER_MS", self.linger_ms, 0)
        if "{table}" not in self.table_name_format:
            raise ConfigError("CDC_SINK__TABLE_NAME_FORMAT must contain {table}")
        try:
            self.table_name_format.format(table="t", keyspace="k")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"CDC_SINK__TABLE_NAME_FORMAT: {exc!r}") from None
        check_range("CDC_SINK__TOMBSTONE_GRACE_SECONDS", self.tombstone_grace_seconds, 0)
        check_range("CDC_SINK__RETRY_ATTEMPTS", self.retry_attempts, 1)
        if not 0 < self.retry_base_seconds <= self.retry_max_seconds:
            raise ConfigError(
                "CDC_SINK__RETRY_BASE_SECONDS must be > 0 and <= CDC_SINK__RETRY_MAX_SECONDS"
            )
        check_positive("CDC_SINK__SHUTDOWN_TIMEOUT_SECONDS", self.shutdown_timeout_seconds)
        check_positive("CDC_SINK__EXPIRY_INTERVAL_SECONDS", self.expiry_interval_seconds)


@dataclass(frozen=True)
class DlqConfig:
    topic: str = "dlq-events"
    topic_partitions: int = 1
    topic_replication_factor: int = 0  # 0: min(3, brokers in the cluster)
    max_share: float = 0.1
    window_records: int = 1000
    # How often a pod looks for resume requests made through another pod's API.
    resume_poll_seconds: float = 5.0

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", self.topic):
            raise ConfigError(
                "CDC_DLQ__TOPIC must be a Kafka topic name: 1 to 249 of A-Z a-z 0-9 . _ -"
            )
        check_range("CDC_DLQ__TOPIC_PARTITIONS", self.topic_partitions, 1)
        if self.topic_replication_factor < 0:
            raise ConfigError("CDC_DLQ__TOPIC_REPLICATION_FACTOR must be >= 1, or 0 (automatic)")
        if not self.max_share >= 0:
            raise ConfigError("CDC_DLQ__MAX_SHARE must be >= 0 (1 or more: no limit)")
        check_range("CDC_DLQ__WINDOW_RECORDS", self.window_records, 1)
        check_positive("CDC_DLQ__RESUME_POLL_SECONDS", self.resume_poll_seconds, 3600)


@dataclass(frozen=True)
class HttpConfig:
    """The probes and metrics listener (/health, /ready, /metrics; no authentication)."""

    host: str = "127.0.0.1"  # a pod sets 0.0.0.0 for its kubelet and Prometheus
    port: int = 8000
    enabled: bool = True

    def validate(self) -> None:
        if not 0 <= self.port <= 65_535:
            raise ConfigError("CDC_HTTP__PORT must be between 0 (any free port) and 65535")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


JWT_SOURCES = (
    "CDC_API__JWT_SECRET, CDC_VAULT__API_JWT_SECRET, CDC_API__JWKS_URL or CDC_API__JWKS_FILE"
)


@dataclass(frozen=True)
class ApiConfig:
    """The control API listener (DLQ and reconciliation routes) and its bearer tokens."""

    host: str = "127.0.0.1"
    port: int = 8001
    jwt_secret: Secret | None = None  # HS256 shared secret
    jwks_url: str | None = None  # RS256/ES256 public keys, refetched on an unknown kid
    jwks_file: str | None = None
    jwt_issuer: str | None = None  # checked when set
    jwt_audience: str | None = None  # checked when set
    jwt_leeway_s: float = 30.0  # clock skew allowed on exp and nbf
    # Serving the API beyond loopback without tokens: refused unless this says so.
    insecure_no_auth: bool = False
    max_connections: int = 200  # more at once are answered 503
    max_body_bytes: int = 1_048_576
    max_header_bytes: int = 65_536
    keep_alive_s: float = 5.0  # an idle connection is closed after this
    request_timeout_s: float = 10.0  # for the request (head and body) to arrive

    def validate(self) -> None:
        if not 0 <= self.port <= 65_535:
            raise ConfigError("CDC_API__PORT must be between 0 (any free port) and 65535")
        check_http_url("CDC_API__JWKS_URL", self.jwks_url)
        check_files("CDC_API", self, "jwks_file")
        if self.jwt_secret is not None and (self.jwks_url or self.jwks_file):
            raise ConfigError("CDC_API__JWT_SECRET (HS256) and CDC_API__JWKS_* exclude each other")
        if self.jwks_url and self.jwks_file:
            raise ConfigError("CDC_API__JWKS_URL and CDC_API__JWKS_FILE exclude each other")
        if self.jwt_secret is not None and len(self.jwt_secret.reveal().encode()) < 32:
            raise ConfigError("CDC_API__JWT_SECRET must be at least 32 bytes (HS256)")
        check_range("CDC_API__JWT_LEEWAY_S", self.jwt_leeway_s, 0, 300)
        for name, low in (
            ("max_connections", 1),
            ("max_body_bytes", 1),
            ("max_header_bytes", 1024),
        ):
            check_range(f"CDC_API__{name.upper()}", getattr(self, name), low)
        for name in ("keep_alive_s", "request_timeout_s"):
            check_positive(f"CDC_API__{name.upper()}", getattr(self, name))


@dataclass(frozen=True)
class GdprConfig:
    """Erasure: the key of the HMAC-SHA-256 that erased keys are kept as (from here or from
    Vault KV, CDC_VAULT__GDPR_HASH_KEY), and how long what the sink keeps beside the rows lives."""

    hash_key: Secret | None = None  # erasing needs it, and so does writing a table with erasures
    dlq_retention_days: float = 30.0  # `_cdc_dlq_records` rows older than this are purged
    mismatch_retention_days: float = 30.0  # resolved reconciliation mismatches, likewise
    audit_retention_days: float = 365.0  # `_cdc_audit_log` rows
    retention_interval_seconds: float = 300.0  # how often housekeeping purges
    retention_batch_rows: int = 1000  # rows per purge transaction

    def validate(self) -> None:
        if self.hash_key is not None and len(self.hash_key.reveal().encode()) < 32:
            raise ConfigError("CDC_GDPR__HASH_KEY must be at least 32 bytes")
        for name in ("dlq_retention_days", "mismatch_retention_days", "audit_retention_days"):
            check_positive(f"CDC_GDPR__{name.upper()}", getattr(self, name))
        check_positive("CDC_GDPR__RETENTION_INTERVAL_SECONDS", self.retention_interval_seconds)
        check_range("CDC_GDPR__RETENTION_BATCH_ROWS", self.retention_batch_rows, 1, 100_000)


@dataclass(frozen=True)
class CassandraConfig:
    contact_points: str | None = None
    port: int = 9042
    local_dc: str = "datacenter1"
    username: str | None = None
    password: Secret | None = None
    # TLS: the server's certificate is checked against ssl_cafile (None: the system's CAs)
    # and must name the contact point it is reached at.
    ssl: bool = False
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None  # PEM client certificate, with ssl_keyfile
    ssl_keyfile: str | None = None

    def validate(self) -> None:
        check_range("CDC_CASSANDRA__PORT", self.port, 1, 65_535)
        if bool(self.username) != bool(self.password):
            raise ConfigError("CDC_CASSANDRA__USERNAME and CDC_CASSANDRA__PASSWORD go together")
        check_client_certificate("CDC_CASSANDRA", self.ssl_certfile, self.ssl_keyfile)
        if not self.ssl and (self.ssl_cafile or self.ssl_certfile):
            raise ConfigError(
                "CDC_CASSANDRA__SSL_CAFILE and CDC_CASSANDRA__SSL_CERTFILE need "
                "CDC_CASSANDRA__SSL=true"
            )
        check_files("CDC_CASSANDRA", self, "ssl_cafile", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class VaultConfig:
    addr: str | None = None
    token: Secret | None = None
    role_id: str | None = None  # AppRole login instead of a token
    secret_id: Secret | None = None
    approle_mount: str = "approle"
    postgres_role: str | None = None  # database secrets engine role: leased PostgreSQL logins
    database_mount: str = "database"
    cassandra_secret: str | None = None  # KV v2 path holding Cassandra's username and password
    api_jwt_secret: str | None = None  # KV v2 path whose `secret` is the API's HS256 key
    gdpr_hash_key: str | None = None  # KV v2 path whose `secret` is CDC_GDPR__HASH_KEY
    masking_key_secret: str | None = None  # KV v2 path whose `secret` is the masking hash key
    kv_mount: str = "secret"
    timeout_seconds: float = 10.0
    ssl_cafile: str | None = None  # PEM; None: the system's trusted CAs
    # Tokens and secrets would cross the network in clear: http:// is refused beyond loopback
    # unless this says otherwise.
    allow_plain_http: bool = False

    def used(self) -> list[str]:
        """The settings that ask for a secret from Vault; none: Vault is not used."""
        names = "postgres_role cassandra_secret api_jwt_secret gdpr_hash_key masking_key_secret"
        return [f"CDC_VAULT__{name.upper()}" for name in names.split() if getattr(self, name)]

    def validate(self) -> None:
        check_http_url("CDC_VAULT__ADDR", self.addr)
        check_files("CDC_VAULT", self, "ssl_cafile")
        parts = urlsplit(self.addr or "")
        # A name other than localhost may resolve anywhere: beyond loopback.
        plain = parts.scheme == "http" and not is_loopback(parts.hostname or "")
        if plain and not self.allow_plain_http:
            raise ConfigError(
                "CDC_VAULT__ADDR is http:// to a host beyond loopback: tokens and secrets would "
                "travel in clear; use https://, or set CDC_VAULT__ALLOW_PLAIN_HTTP=true"
            )
        check_positive("CDC_VAULT__TIMEOUT_SECONDS", self.timeout_seconds, 300)
        if bool(self.role_id) != bool(self.secret_id):
            raise ConfigError("CDC_VAULT__ROLE_ID and CDC_VAULT__SECRET_ID go together (AppRole)")
        used = self.used()
        if not used:
            return
        wanted = used[0]
        if not self.addr:
            raise ConfigError(f"{wanted} needs CDC_VAULT__ADDR")
        if not (self.token or self.role_id):
            raise ConfigError(
                f"{wanted} needs a Vault login: CDC_VAULT__TOKEN, or CDC_VAULT__ROLE_ID and "
                "CDC_VAULT__SECRET_ID"
            )


@dataclass(frozen=True)
class MaskingConfig:
    """PII masking (README "PII masking"); the rules are parsed by model.masking at start-up."""

    # `keyspace.table.column=method` entries, separated by `;` or new lines.
    rules: str = ""
    # The `hash` method's HMAC key, unless CDC_VAULT__MASKING_KEY_SECRET names it in Vault.
    hash_key: Secret | None = None
    marker: str = "***"  # what `redact` writes, `partial` puts in, error messages show

    def validate(self) -> None:
        if not self.marker or len(self.marker) > 64:
            raise ConfigError("CDC_MASKING__MARKER must be 1 to 64 characters")
        if self.hash_key is not None and len(self.hash_key.reveal().encode()) < 32:
            raise ConfigError("CDC_MASKING__HASH_KEY must be at least 32 bytes")


@dataclass(frozen=True)
class UrlConfig:
    url: str | None = None


@dataclass(frozen=True)
class TracingConfig:
    endpoint: str | None = None  # OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces
    sample_ratio: float = 0.1
    service_name: str = "cdc-sink"
    export_timeout_seconds: float = 10.0

    def validate(self) -> None:
        check_http_url("CDC_TRACING__ENDPOINT", self.endpoint)
        check_range("CDC_TRACING__SAMPLE_RATIO", self.sample_ratio, 0, 1)
        if not self.service_name.strip():
            raise ConfigError("CDC_TRACING__SERVICE_NAME must not be empty")
        check_positive("CDC_TRACING__EXPORT_TIMEOUT_SECONDS", self.export_timeout_seconds, 300)


LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    json: bool = True
    repeat_window_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.level.lower() not in LOG_LEVELS:
            raise ConfigError(f"CDC_LOG__LEVEL must be one of {', '.join(LOG_LEVELS)}")
        check_range("CDC_LOG__REPEAT_WINDOW_SECONDS", self.repeat_window_seconds, 0, 86_400)


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    schema_registry: SchemaRegistryConfig = field(default_factory=SchemaRegistryConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)
    dlq: DlqConfig = field(default_factory=DlqConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    gdpr: GdprConfig = field(default_factory=GdprConfig)
    cassandra: CassandraConfig = field(default_factory=CassandraConfig)
    vault: VaultConfig = field(default_factory=VaultConfig)
    pushgateway: UrlConfig = field(default_factory=UrlConfig)
    prometheus: UrlConfig = field(default_factory=UrlConfig)
    alertmanager: UrlConfig = field(default_factory=UrlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    # Sections other packages own (reconciliation's), by name: see `load_config`'s `sections`.
    owned: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}), hash=False)

    def section(self, name: str, cls: type[S]) -> S:
        """The owned section `name`, or `cls`'s defaults if it was not loaded."""
        found = self.owned.get(name)
        return found if isinstance(found, cls) else cls()


def load_config(
    environ: Mapping[str, str] | None = None,
    file: Path | None = None,
    *,
    sections: Mapping[str, type] = types.MappingProxyType({}),
) -> Config:
    """Read the file (if any) and the CDC_* environment; raise ConfigError on any bad value.

    `sections` adds the sections other packages own (name -> frozen dataclass with defaults and
    an optional `validate()`), read like the sink's own and kept in `Config.owned`; a section
    nobody named is refused."""
    environ = os.environ if environ is None else environ
    file_name = file or (
        Path(environ["CDC_CONFIG_FILE"]) if environ.get("CDC_CONFIG_FILE") else None
    )
    raw: dict[str, dict[str, Any]] = {}
    if file_name is not None:
        try:
            document = tomllib.loads(file_name.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {file_name}: {exc}") from None
        for section, values in document.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config file {file_name}: {section} must be a [{section}] table")
            raw[section] = dict(values)
    own = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "owned"}
    known: dict[str, Any] = {**own, **sections}
    for name, value in environ.items():
        if not name.startswith("CDC_") or "__" not in name or name == "CDC_CONFIG_FILE":
            continue
        section, _, key = name[4:].lower().partition("__")
        if section not in known:
            raise ConfigError(f"{name} is not a known setting (no section {section!r})")
        raw.setdefault(section, {})[key] = value
    built = {section: _build(cls, section, raw.pop(section, {})) for section, cls in known.items()}
    if raw:
        raise ConfigError(f"unknown configuration section(s): {', '.join(sorted(raw))}")
    owned = types.MappingProxyType({name: built.pop(name) for name in sections})
    config = Config(**built, owned=owned)
    for name, section in {**built, **owned}.items():
        validate = getattr(section, "validate", None)
        if validate:
            validate()
        if isinstance(section, UrlConfig):
            check_http_url(f"CDC_{name.upper()}__URL", section.url)
    _check_api_exposure(config)
    if config.vault.gdpr_hash_key and config.gdpr.hash_key is not None:
        raise ConfigError("choose one of CDC_GDPR__HASH_KEY and CDC_VAULT__GDPR_HASH_KEY")
    return config


def _check_api_exposure(config: Config) -> None:
    """ConfigError if the control API would answer anyone beyond loopback without a token."""
    api = config.api
    if config.vault.api_jwt_secret and (api.jwt_secret or api.jwks_url or api.jwks_file):
        raise ConfigError(f"choose one of {JWT_SOURCES}")
    if is_loopback(api.host) or api.insecure_no_auth or not config.http.enabled:
        return
    if api.jwt_secret or api.jwks_url or api.jwks_file or config.vault.api_jwt_secret:
        return
    raise ConfigError(
        f"CDC_API__HOST={api.host} serves the control API beyond loopback without "
        f"authentication: set {JWT_SOURCES}, or CDC_API__INSECURE_NO_AUTH=true to accept that "
        "anyone who reaches the port may replay, resume and read dead letters"
    )


def _build(cls: Any, section: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        setting = f"CDC_{section.upper()}__{key.upper()}"
        if key not in known:
            raise ConfigError(f"{setting} is not a known setting")
        kwargs[key] = _coerce(hints[key], value, setting)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, setting: str) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value in ("", None):
            return None
        hint = options[0]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint in (str, Secret):
            if not isinstance(value, str):  # a TOML number, list or table where text belongs
                raise ValueError(f"expected text, not {type(value).__name__}")
            return hint(value)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"expected a number, not {type(value).__name__}")
        if hint is int and isinstance(value, float):
            raise ValueError("expected a whole number")
        if hint in (int, float):
            return hint(value)
    except (TypeError, ValueError) as exc:
        shown = "***" if hint is Secret else repr(value)
        raise ConfigError(f"{setting}={shown} is invalid: {exc}") from None
    raise ConfigError(f"{setting}: unsupported type {hint}")
