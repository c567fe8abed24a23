"""Cassandra through cassandra-driver: one way to connect, one way to read a table's schema.

The sink reads column types from `system_schema` (catalog.py); reconciliation reads data and
schema. Both are blocking calls: run them in a thread.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from cdc_sink.config import CassandraConfig
from cdc_sink.errors import FatalError
from cdc_sink.model.cql import CqlType, parse_cql_type
from cdc_sink.ops.tls import client_context, is_untrusted_certificate, untrusted_hint


@dataclass(frozen=True)
class CassandraTable:
    """A table as Cassandra's system_schema describes it. `unsupported` holds the value
    columns whose type the sink cannot map (name -> Cassandra's type text, e.g. a vector)."""

    columns: dict[str, CqlType]
    partition_columns: tuple[str, ...]
    clustering_columns: tuple[str, ...] = ()
    unsupported: dict[str, str] = field(default_factory=dict)


def connect(
    cfg: CassandraConfig,
    *,
    consistency: str | None = None,
    timeout_s: float | None = None,
    plain_tuples: bool = False,
) -> Any:
    """A session on the configured cluster (protocol v5, the local DC's nodes first, TLS and
    a login when configured); `consistency` and `timeout_s` override the driver's defaults,
    `plain_tuples` returns rows as tuples (cheaper than named tuples for large reads). A node
    certificate that is not trusted raises FatalError naming CDC_CASSANDRA__SSL_CAFILE; other
    failures raise what the driver raises."""
    from cassandra import ConsistencyLevel
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
    from cassandra.policies import DCAwareRoundRobinPolicy
    from cassandra.query import tuple_factory

    if not cfg.contact_points:
        raise ValueError("no Cassandra configured: set CDC_CASSANDRA__CONTACT_POINTS")
    auth = (
        PlainTextAuthProvider(cfg.username, cfg.password.reveal() if cfg.password else "")
        if cfg.username
        else None
    )
    options: dict[str, Any] = {"load_balancing_policy": DCAwareRoundRobinPolicy(cfg.local_dc)}
    if consistency is not None:
        options["consistency_level"] = ConsistencyLevel.name_to_value[consistency.upper()]
    if timeout_s is not None:
        options["request_timeout"] = timeout_s
    if plain_tuples:
        options["row_factory"] = tuple_factory
    cluster = Cluster(
        [h.strip() for h in cfg.contact_points.split(",")],
        port=cfg.port,
        auth_provider=auth,
        execution_profiles={EXEC_PROFILE_DEFAULT: ExecutionProfile(**options)},
        protocol_version=5,
        ssl_context=tls_context(cfg),
    )
    try:
        return cluster.connect()
    except NoHostAvailable as exc:
        cluster.shutdown()
        if any(is_untrusted_certificate(e) for e in exc.errors.values()):
            hint = untrusted_hint("Cassandra", "CDC_CASSANDRA__SSL_CAFILE", cfg.ssl_cafile)
            raise FatalError(
                f"cannot connect to Cassandra: {hint}: {exc}", stage="cassandra"
            ) from exc
        raise
    except Exception:
        cluster.shutdown()
        raise


def tls_context(cfg: CassandraConfig) -> ssl.SSLContext | None:
    """The context that verifies each node's certificate (and its name: the address the driver
    reaches it at) when CDC_CASSANDRA__SSL is on; None otherwise."""
    if not cfg.ssl:
        return None
    return client_context(
        "CDC_CASSANDRA__SSL_CAFILE", cfg.ssl_cafile, cfg.ssl_certfile, cfg.ssl_keyfile
    )


def describe_table(session: Any, keyspace: str, table: str) -> CassandraTable | None:
    """The table's columns (UDTs with their fields) and key columns; None if there is none."""
    # Fields by position: works with the driver's named tuples and with plain tuples.
    udts = {
        row[0]: list(zip(row[1], row[2], strict=True))
        for row in session.execute(
            "SELECT type_name, field_names, field_types FROM system_schema.types "
            "WHERE keyspace_name = %s",
            [keyspace],
        )
    }
    rows = list(
        session.execute(
            "SELECT column_name, type, kind, position FROM system_schema.columns "
            "WHERE keyspace_name = %s AND table_name = %s",
            [keyspace, table],
        )
    )
    if not rows:
        return None

    def ordered(kind: str) -> tuple[str, ...]:
        return tuple(name for _, name in sorted((r[3], r[0]) for r in rows if r[2] == kind))

    partition, clustering = ordered("partition_key"), ordered("clustering")
    columns: dict[str, CqlType] = {}
    unsupported: dict[str, str] = {}
    for name, type_text, *_ in rows:
        try:
            columns[name] = parse_cql_type(type_text, udts)
        except ValueError:
            if name in partition or name in clustering:
                raise
            unsupported[name] = type_text  # a type newer than the sink (vector, …)
    return CassandraTable(columns, partition, clustering, unsupported)
