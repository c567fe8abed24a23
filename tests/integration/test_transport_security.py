"""TLS with verification on every hop (Kafka, PostgreSQL, Cassandra, the registry, Vault) and
credentials the services really check, against the stack's secured endpoints."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import hvac
import pytest
import trustme
from cassandra.cluster import NoHostAvailable

from cdc_sink.config import ConfigError, load_config
from cdc_sink.decode.registry import ConfluentRegistry
from cdc_sink.errors import FatalError
from cdc_sink.ops.secrets import PostgresLogin, VaultError, open_secrets
from cdc_sink.schema import cassandra
from tests.support.auth_proxy import AuthProxy
from tests.support.debezium_avro import (
    WHOLE_SOURCE_FIELDS,
    envelope,
    key_schema,
    register,
    wire,
)
from tests.support.names import Unique
from tests.support.pipeline import (
    cassandra_session,
    create_cassandra_table,
    create_topic,
    execute_cql,
    fetch_rows,
    fetch_value,
    produce,
    run_cli,
    run_worker,
    sink_env,
)
from tests.support.stack import Endpoints

TS = 1_900_000_000_000_000
REGISTRY_USER, REGISTRY_PASSWORD = "sink-reader", "registry-password"


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CA bundle that signed none of the stack's certificates."""
    path = tmp_path_factory.mktemp("foreign") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def registry_proxy(
    stack: Endpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthProxy]:
    """The stack's registry behind TLS and basic auth."""
    folder = tmp_path_factory.mktemp("registry")
    with AuthProxy(stack.schema_registry_url, REGISTRY_USER, REGISTRY_PASSWORD, folder) as proxy:
        yield proxy


def secured(stack: Endpoints, proxy: AuthProxy, cassandra_secret: str) -> dict[str, str]:
    """Settings that reach every service over TLS, verifying it, with checked credentials:
    Kafka by SCRAM-SHA-512, PostgreSQL verify-full, Cassandra with its login read from Vault's
    KV over Vault's TLS listener (and a client certificate), the registry through its
    basic-auth TLS proxy."""
    ca = stack["CDC_STACK_CA_FILE"]
    return {
        "CDC_KAFKA__BOOTSTRAP_SERVERS": stack["CDC_STACK_KAFKA_SECURED"],
        "CDC_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "CDC_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "CDC_KAFKA__SASL_USERNAME": stack["CDC_STACK_KAFKA_SASL_USERNAME"],
        "CDC_KAFKA__SASL_PASSWORD": stack["CDC_STACK_KAFKA_SASL_PASSWORD"],
        "CDC_KAFKA__SSL_CAFILE": ca,
        "CDC_POSTGRES__SSLMODE": "verify-full",
        "CDC_POSTGRES__SSLROOTCERT": ca,
        "CDC_CASSANDRA__SSL": "true",
        "CDC_CASSANDRA__SSL_CAFILE": ca,
        "CDC_CASSANDRA__SSL_CERTFILE": stack["CDC_STACK_CLIENT_CERTFILE"],
        "CDC_CASSANDRA__SSL_KEYFILE": stack["CDC_STACK_CLIENT_KEYFILE"],
        "CDC_CASSANDRA__USERNAME": "",
        "CDC_CASSANDRA__PASSWORD": "",
        "CDC_VAULT__ADDR": stack["CDC_STACK_VAULT_TLS_ADDR"],
        "CDC_VAULT__SSL_CAFILE": ca,
        "CDC_VAULT__CASSANDRA_SECRET": cassandra_secret,
        "CDC_SCHEMA_REGISTRY__URL": proxy.url,
        "CDC_SCHEMA_REGISTRY__USERNAME": REGISTRY_USER,
        "CDC_SCHEMA_REGISTRY__PASSWORD": REGISTRY_PASSWORD,
        "CDC_SCHEMA_REGISTRY__SSL_CAFILE": proxy.ca_file,
    }


def cassandra_login_in_vault(stack: Endpoints, unique: Unique) -> str:
    """Store the stack's Cassandra login in Vault's KV v2 (mount `secret`); return the path."""
    path = unique("cdc-sink/cassandra")
    client = hvac.Client(url=stack.vault_addr, token=stack.vault_token)
    client.secrets.kv.v2.create_or_update_secret(
        path=path,
        secret={
            "username": stack["CDC_CASSANDRA__USERNAME"],
            "password": stack["CDC_CASSANDRA__PASSWORD"],
        },
    )
    return path


class UserRecords:
    """Avro records of <keyspace>.users (pk int, name text, score double), their schemas in
    the stack's registry (registered directly, not through the proxy)."""

    def __init__(self, stack: Endpoints, keyspace: str, subject: str) -> None:
        self.keyspace = keyspace
        namespace = f"ns.{subject.replace('-', '_')}"
        self.key_schema = key_schema(namespace)
        columns = [("pk", "int"), ("name", "string"), ("score", "double")]
        self.value_schema = envelope(
            columns, namespace=namespace, distinct_names=True, source_fields=WHOLE_SOURCE_FIELDS
        )
        self.key_id, self.value_id = register(
            stack.schema_registry_url, subject, self.key_schema, self.value_schema
        )

    def record(self, pk: int, name: str, score: float) -> tuple[bytes, bytes]:
        def filled(value: Any) -> dict[str, Any]:
            return {"value": value, "deletion_ts": None, "set": True}

        datum = {
            "ts_ms": TS // 1000,
            "op": "i",
            "source": {"ts_us": TS + pk, "keyspace": self.keyspace, "table": "users"},
            "after": {
                "pk": filled(pk),
                "name": filled(name),
                "score": filled(score),
                "_range_start": None,
                "_range_end": None,
            },
        }
        return (
            wire(self.key_id, self.key_schema, {"pk": pk}),
            wire(self.value_id, self.value_schema, datum),
        )


async def users_pipeline(stack: Endpoints, unique: Unique) -> tuple[str, str, dict[int, Any]]:
    """A users table in Cassandra with rows, the same rows as Avro events on a new topic;
    returns the keyspace, the topic and the rows."""
    keyspace, topic = unique.keyspace("ks"), unique("cdc-events-users")
    create_cassandra_table(
        stack,
        keyspace,
        f"CREATE TABLE {keyspace}.users (pk int PRIMARY KEY, name text, score double)",
    )
    rows = {pk: (f"user-{pk}", pk / 4) for pk in range(1, 21)}
    execute_cql(
        stack,
        *(
            f"INSERT INTO {keyspace}.users (pk, name, score) VALUES ({pk}, '{name}', {score}) "
            f"USING TIMESTAMP {TS + pk}"
            for pk, (name, score) in rows.items()
        ),
    )
    records = UserRecords(stack, keyspace, topic)
    await create_topic(stack.kafka, topic, 2)
    await produce(stack.kafka, topic, [records.record(pk, *row) for pk, row in rows.items()])
    return keyspace, topic, rows


async def test_the_sink_and_a_reconciliation_job_use_tls_on_every_hop(
    stack: Endpoints, unique: Unique, registry_proxy: AuthProxy
) -> None:
    """A worker applies Avro events with TLS and verification on every connection (Kafka
    SCRAM-SHA-512, PostgreSQL verify-full, Cassandra with its login from Vault over TLS, the
    registry with basic auth); a checksum reconciliation job over the same settings finds
    PostgreSQL equal to Cassandra."""
    _, topic, rows = await users_pipeline(stack, unique)
    schema = unique.schema("tls")
    env = {
        **sink_env(stack, topic=topic, group=unique("g"), schema=schema),
        **secured(stack, registry_proxy, cassandra_login_in_vault(stack, unique)),
        "CDC_SINK__TABLE_NAME_FORMAT": "cdc_{table}",
    }
    worker = await run_worker(env)
    assert worker.applied_events == len(rows)
    assert "Basic " in registry_proxy.authorizations[-1]
    stored = await fetch_rows(stack.postgres_dsn, schema, "SELECT pk, name, score FROM cdc_users")
    assert {r["pk"]: (r["name"], r["score"]) for r in stored} == rows
    done = await asyncio.to_thread(
        run_cli, env, "reconcile", "run", "--table", "cdc_users", "--strategy", "checksum"
    )
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout


async def test_each_hop_really_is_encrypted_and_authenticated(
    stack: Endpoints, unique: Unique, registry_proxy: AuthProxy
) -> None:
    """PostgreSQL reports the session as TLS 1.3; Cassandra lists the login as encrypted."""
    config = load_config(
        {
            **sink_env(stack, topic="t", group="g", schema="public"),
            **secured(stack, registry_proxy, cassandra_login_in_vault(stack, unique)),
        }
    )
    config, login = await open_secrets(config)
    conn = await login.connect()
    try:
        ssl_row = await conn.fetchrow(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await conn.close()
    assert (ssl_row["ssl"], ssl_row["version"]) == (True, "TLSv1.3")
    # Other sessions of this process may be open (plain ones among them): ours are the
    # connections that were not there before it connected.
    query = "SELECT address, port, username, ssl_enabled, driver_name FROM system_views.clients"
    plain = cassandra_session(stack)
    try:
        before = {(c.address, c.port) for c in plain.execute(query)}
    finally:
        plain.cluster.shutdown()
    session = await asyncio.to_thread(cassandra.connect, config.cassandra)
    try:
        ours = [
            c
            for c in session.execute(query)
            if c.driver_name and "Python" in c.driver_name and (c.address, c.port) not in before
        ]
    finally:
        session.cluster.shutdown()
    assert ours
    assert all((c.username, c.ssl_enabled) == ("cassandra", True) for c in ours)


@pytest.mark.parametrize(
    ("service", "setting", "named"),
    [
        ("kafka", "CDC_KAFKA__SSL_CAFILE", "cannot reach Kafka.*CDC_KAFKA__SSL_CAFILE"),
        ("postgres", "CDC_POSTGRES__SSLROOTCERT", "PostgreSQL's certificate.*SSLROOTCERT"),
        ("cassandra", "CDC_CASSANDRA__SSL_CAFILE", "Cassandra's certificate.*SSL_CAFILE"),
        ("registry", "CDC_SCHEMA_REGISTRY__SSL_CAFILE", "registry.*REGISTRY__SSL_CAFILE"),
        ("vault", "CDC_VAULT__SSL_CAFILE", "Vault's certificate.*CDC_VAULT__SSL_CAFILE"),
    ],
)
async def test_a_wrong_ca_stops_the_worker_naming_service_and_setting(
    stack: Endpoints,
    unique: Unique,
    registry_proxy: AuthProxy,
    foreign_ca: str,
    service: str,
    setting: str,
    named: str,
) -> None:
    """With one CA bundle that did not sign the service's certificate, the worker stops at
    once with a message naming that service and setting, and writes nothing."""
    _, topic, _ = await users_pipeline(stack, unique)
    schema = unique.schema("wrongca")
    env = {
        **sink_env(stack, topic=topic, group=unique("g"), schema=schema),
        **secured(stack, registry_proxy, cassandra_login_in_vault(stack, unique)),
        setting: foreign_ca,
    }
    with pytest.raises(FatalError, match=named):
        await run_worker(env)
    assert not await fetch_value(
        stack.postgres_dsn,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 "
        "AND table_name = 'cdc_users'",
        schema,
    )


async def test_a_wrong_ca_stops_a_reconciliation_job_naming_cassandra(
    stack: Endpoints, unique: Unique, registry_proxy: AuthProxy, foreign_ca: str
) -> None:
    """`reconcile run` with a CA that did not sign Cassandra's certificate exits 1 naming
    CDC_CASSANDRA__SSL_CAFILE."""
    env = {
        **sink_env(stack, topic="t", group="g", schema=unique.schema("recon")),
        **secured(stack, registry_proxy, cassandra_login_in_vault(stack, unique)),
        "CDC_CASSANDRA__SSL_CAFILE": foreign_ca,
    }
    assert run_cli(env, "migrate").returncode == 0
    done = await asyncio.to_thread(
        run_cli, env, "reconcile", "run", "--table", "cdc_users", "--strategy", "row_count"
    )
    assert done.returncode != 0
    assert "CDC_CASSANDRA__SSL_CAFILE" in done.stderr


def test_cassandra_checks_the_password_and_the_client_certificate(stack: Endpoints) -> None:
    """The stack's Cassandra refuses a wrong password, no password, and over TLS a client
    without a certificate from the stack's CA."""
    settings = {
        "CDC_CASSANDRA__CONTACT_POINTS": stack["CDC_CASSANDRA__CONTACT_POINTS"],
        "CDC_CASSANDRA__PORT": stack["CDC_CASSANDRA__PORT"],
        "CDC_CASSANDRA__SSL": "true",
        "CDC_CASSANDRA__SSL_CAFILE": stack["CDC_STACK_CA_FILE"],
        "CDC_CASSANDRA__SSL_CERTFILE": stack["CDC_STACK_CLIENT_CERTFILE"],
        "CDC_CASSANDRA__SSL_KEYFILE": stack["CDC_STACK_CLIENT_KEYFILE"],
        "CDC_CASSANDRA__USERNAME": "cassandra",
    }
    for password in ("wrong", None):
        environ = dict(settings)
        if password is None:
            del environ["CDC_CASSANDRA__USERNAME"]
        else:
            environ["CDC_CASSANDRA__PASSWORD"] = password
        with pytest.raises(NoHostAvailable, match=r"Authentication|credentials"):
            cassandra.connect(load_config(environ).cassandra)
    without_certificate = dict(settings, CDC_CASSANDRA__PASSWORD=stack["CDC_CASSANDRA__PASSWORD"])
    del without_certificate["CDC_CASSANDRA__SSL_CERTFILE"]
    del without_certificate["CDC_CASSANDRA__SSL_KEYFILE"]
    with pytest.raises(NoHostAvailable) as refused:
        cassandra.connect(load_config(without_certificate).cassandra)
    assert "Authentication" not in str(refused.value)


async def test_registry_basic_auth_is_sent_and_a_wrong_password_is_fatal(
    stack: Endpoints, unique: Unique, registry_proxy: AuthProxy
) -> None:
    """The credential settings, and the URL's userinfo, reach the registry as basic auth; a
    wrong password is a FatalError naming the settings, not a retry."""
    subject = unique("cdc-events-auth")
    records = UserRecords(stack, "ks", subject)
    base = {
        "CDC_SCHEMA_REGISTRY__URL": registry_proxy.url,
        "CDC_SCHEMA_REGISTRY__SSL_CAFILE": registry_proxy.ca_file,
    }
    good = {
        **base,
        "CDC_SCHEMA_REGISTRY__USERNAME": REGISTRY_USER,
        "CDC_SCHEMA_REGISTRY__PASSWORD": REGISTRY_PASSWORD,
    }
    in_url = {
        **base,
        "CDC_SCHEMA_REGISTRY__URL": registry_proxy.url.replace(
            "https://", f"https://{REGISTRY_USER}:{REGISTRY_PASSWORD}@"
        ),
    }
    for environ in (good, in_url):
        async with ConfluentRegistry.from_config(load_config(environ).schema_registry) as client:
            assert json.loads(await client.schema_by_id(records.value_id))["name"] == "Envelope"
    wrong = {**good, "CDC_SCHEMA_REGISTRY__PASSWORD": "wrong"}
    async with ConfluentRegistry.from_config(load_config(wrong).schema_registry) as client:
        with pytest.raises(FatalError, match=r"HTTP 401.*CDC_SCHEMA_REGISTRY__PASSWORD"):
            await client.schema_by_id(records.value_id)


async def test_vault_over_tls_and_a_wrong_ca(
    stack: Endpoints, unique: Unique, foreign_ca: str
) -> None:
    """Vault's TLS listener serves the Cassandra login with its CA; a foreign CA is a
    VaultError naming CDC_VAULT__SSL_CAFILE."""
    path = cassandra_login_in_vault(stack, unique)
    environ = {
        "CDC_VAULT__ADDR": stack["CDC_STACK_VAULT_TLS_ADDR"],
        "CDC_VAULT__TOKEN": stack.vault_token,
        "CDC_VAULT__CASSANDRA_SECRET": path,
        "CDC_VAULT__SSL_CAFILE": stack["CDC_STACK_CA_FILE"],
    }
    config, _ = await open_secrets(load_config(environ))
    assert config.cassandra.username == stack["CDC_CASSANDRA__USERNAME"]
    with pytest.raises(VaultError, match="CDC_VAULT__SSL_CAFILE"):
        await open_secrets(load_config({**environ, "CDC_VAULT__SSL_CAFILE": foreign_ca}))


def test_plain_http_vault_beyond_loopback_is_refused() -> None:
    """An http:// Vault address on another host stops start-up unless explicitly allowed."""
    with pytest.raises(ConfigError, match="CDC_VAULT__ALLOW_PLAIN_HTTP"):
        load_config({"CDC_VAULT__ADDR": "http://vault.example:8200"})


async def test_postgres_verify_full_with_client_certificate(stack: Endpoints) -> None:
    """verify-full with the stack's CA and a client certificate connects over TLS."""
    config = load_config(
        {
            "CDC_POSTGRES__DSN": stack.postgres_dsn,
            "CDC_POSTGRES__SSLMODE": "verify-full",
            "CDC_POSTGRES__SSLROOTCERT": stack["CDC_STACK_CA_FILE"],
            "CDC_POSTGRES__SSLCERT": stack["CDC_STACK_CLIENT_CERTFILE"],
            "CDC_POSTGRES__SSLKEY": stack["CDC_STACK_CLIENT_KEYFILE"],
        }
    )
    conn = await PostgresLogin(config).connect()
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await conn.close()
