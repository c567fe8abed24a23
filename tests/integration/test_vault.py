"""Secrets from Vault (the stack's OpenBao): PostgreSQL users leased from its database
secrets engine and replaced before they expire while batches keep committing, an AppRole
login, Cassandra's credentials from KV, and clear errors when Vault refuses or is away."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from cdc_sink.config import Secret, load_config
from cdc_sink.ops.secrets import PostgresLogin, reconnect_idle
from tests.support.cassandra_model import Mutation
from tests.support.pipeline import (
    applied,
    create_cassandra_model_table,
    create_topic,
    fetch_value,
    http_get,
    json_lines,
    listening_port,
    produce,
    run_cli,
    schemaless_record,
    sink_env,
    start_worker_process,
)
from tests.support.stack import Endpoints
from tests.support.tcp_proxy import TcpProxy
from tests.support.vault import leased_postgres

TS = 1_900_000_000_000_000


def insert(i: int, keyspace: str) -> tuple[bytes, bytes]:
    cells = {"v1": (i, None), "v2": (f"s{i}", None), "v3": (i % 7, None)}
    return schemaless_record(Mutation("insert", TS + i, (i % 2, "p", i, "x"), cells), keyspace)


# A worker's sessions (its writer's, its pool's, its API's) whose role is gone: PostgreSQL
# keeps them when a leased user is dropped.
ORPHAN_SESSIONS = (
    "SELECT count(*) FROM pg_stat_activity a "
    "WHERE a.application_name IN ('cdc-sink', 'cdc-sink-api') "
    "AND a.usesysid IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = a.usesysid)"
)


async def count_orphan_sessions(dsn: str, stop: asyncio.Event) -> int:
    """Until `stop`: the most sessions of dropped roles seen at once (sampled every 0.2 s)."""
    most = 0
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            most = max(most, await conn.fetchval(ORPHAN_SESSIONS))
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    return most


# What ends first: the lease (6 s, renewed up to 12 s; tokens last an hour), or the AppRole
# token (6 s, renewed up to 12 s; Vault then revokes the leases it made, renewable for 60 s).
ENDINGS = {
    "lease": ({"max_ttl_s": 12}, "postgres_lease_renewed"),
    "token": ({"max_ttl_s": 60, "token_ttl_s": 6, "token_max_ttl_s": 12}, "vault_logged_in_again"),
}


@pytest.mark.parametrize("ending", ENDINGS)
async def test_leased_postgres_users_are_replaced_before_they_expire_and_no_batch_fails(
    stack: Endpoints, unique: Callable[[str], str], tmp_path: Path, ending: str
) -> None:
    """A worker logging in with AppRole applies a stream of 35 s while its PostgreSQL user
    is renewed and replaced several times, because its lease or its Vault token reaches its
    max TTL. Every record is applied, no transaction is retried, no session of the worker
    outlives its user (the stream pauses for 12 s, so the writer must move while idle too),
    what the sink created belongs to the group role (not to a user that goes away), and once
    the worker has exited no leased user is left."""
    ttls, renewal_event = ENDINGS[ending]
    keyspace, topic = unique("ks"), unique("cdc-events-vault")
    admin_dsn = stack["CDC_STACK_POSTGRES_ADMIN_DSN"]
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, 2)
    async with leased_postgres(stack, unique, ttl_s=6, **ttls) as leased:
        env = sink_env(stack, topic=topic, group=unique("g"), schema=leased.schema)
        env.update(leased.settings, CDC_LOG__LEVEL="info", CDC_SINK__LINGER_MS="50")
        log_path = tmp_path / "worker.log"
        stop_sampling = asyncio.Event()
        orphans = asyncio.create_task(count_orphan_sessions(admin_dsn, stop_sampling))
        worker = start_worker_process(env, log_path, stop_when_caught_up=False)
        total = 0
        try:
            began = time.monotonic()
            while time.monotonic() - began < 35:
                if not 10 < time.monotonic() - began < 22:  # a quiet spell
                    records = [insert(total + i, keyspace) for i in range(40)]
                    await produce(stack.kafka, topic, records)
                    total += 40
                await asyncio.sleep(0.5)
                assert worker.poll() is None, log_path.read_text()[-3000:]
            async with asyncio.timeout(60):
                while await applied(admin_dsn, leased.schema) < total:
                    await asyncio.sleep(0.2)
            port = listening_port(log_path.read_text(), "probes")
            assert port is not None
            _, metrics = await asyncio.to_thread(http_get, port, "/metrics")
            scraped_at = time.time()
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            exit_code = await asyncio.to_thread(worker.wait, 60)
            stop_sampling.set()
        assert "cdc_postgres_login_lease_seconds 6.0" in metrics
        [expiry] = [
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("cdc_postgres_login_expiry_timestamp_seconds ")
        ]
        assert scraped_at - 1 < expiry <= scraped_at + 6  # renewed in time: never expired
        assert await orphans == 0
        lines = json_lines(log_path.read_text())
        assert exit_code == 0, log_path.read_text()[-3000:]
        [first] = [line["user"] for line in lines if line["event"] == "postgres_login_leased"]
        replaced = [line for line in lines if line["event"] == "postgres_login_replaced"]
        assert len(replaced) >= 2, [line["event"] for line in lines]
        users = [first, *(line["user"] for line in replaced)]
        assert len(set(users)) == len(users)
        assert any(line["event"] == renewal_event for line in lines)
        troubles = [
            line
            for line in lines
            if line["level"] == "error" or line["event"].endswith(("_retry", "_failed"))
        ]
        assert troubles == [], troubles

        rows = await fetch_value(admin_dsn, f'SELECT count(*) FROM "{leased.schema}".cdc_model')
        assert rows == total
        owners = await fetch_value(
            admin_dsn,
            "SELECT array_agg(DISTINCT tableowner::text) FROM pg_tables WHERE schemaname = $1",
            leased.schema,
        )
        assert owners == [leased.owner]
        # The last user was revoked at exit; the others ended with their leases.
        async with asyncio.timeout(30):
            while await fetch_value(
                admin_dsn, "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1)", users
            ):
                await asyncio.sleep(0.5)


async def test_vault_refusing_or_away_stops_start_up_saying_which_secret(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """A wrong AppRole secret, a KV secret that is missing, and a Vault address where nothing
    listens each stop `run` and `migrate` with exit 1 and a message naming the step and the
    setting, never a traceback or a secret; once the Cassandra secret is there, start-up goes
    on (and does not show it)."""
    async with leased_postgres(stack, unique, ttl_s=30, max_ttl_s=60) as leased:
        env = sink_env(stack, topic=unique("t"), group=unique("g"), schema=leased.schema)
        env.update(leased.settings)

        wrong = {**env, "CDC_VAULT__SECRET_ID": "00000000-0000-0000-0000-000000000000"}
        refused = run_cli(wrong, "run", timeout=60)
        assert refused.returncode == 1, refused.stderr[-2000:]
        assert "logging in to Vault" in refused.stderr
        assert "AppRole (CDC_VAULT__ROLE_ID" in refused.stderr
        assert "Traceback" not in refused.stderr

        path = leased.cassandra_secret
        missing = {**env, "CDC_VAULT__CASSANDRA_SECRET": path}
        refused = run_cli(missing, "migrate", timeout=60)
        assert refused.returncode == 1, refused.stderr[-2000:]
        assert f"reading CDC_VAULT__CASSANDRA_SECRET '{path}'" in refused.stderr
        assert "Traceback" not in refused.stderr

        await asyncio.to_thread(
            leased.client.secrets.kv.v2.create_or_update_secret,
            path,
            secret={"username": "cdc_reader", "password": "kv-secret-password"},
        )
        migrated = run_cli(missing, "migrate", timeout=60)
        assert migrated.returncode == 0, migrated.stderr[-2000:]
        assert "kv-secret-password" not in migrated.stderr + migrated.stdout

        away = {**env, "CDC_VAULT__ADDR": "http://127.0.0.1:9", "CDC_VAULT__TIMEOUT_SECONDS": "2"}
        refused = run_cli(away, "run", timeout=60)
        assert refused.returncode == 1, refused.stderr[-2000:]
        assert "logging in to Vault at http://127.0.0.1:9" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert env["CDC_VAULT__SECRET_ID"] not in refused.stderr


async def test_vault_away_until_the_lease_ends_stops_the_worker_saying_why(
    stack: Endpoints, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """The worker reaches Vault through a proxy that then refuses every connection: while
    the lease lasts it says it is retrying and goes on applying; when the lease ends it stops
    (exit 1) naming the cause, with every committed offset's rows in place."""
    keyspace, topic = unique("ks"), unique("cdc-events-vault-away")
    admin_dsn = stack["CDC_STACK_POSTGRES_ADMIN_DSN"]
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic, 1)
    vault = urlsplit(stack.vault_addr)
    async with (
        leased_postgres(stack, unique, ttl_s=5, max_ttl_s=60) as leased,
        TcpProxy(vault.hostname or "127.0.0.1", vault.port or 8200) as proxy,
    ):
        env = sink_env(stack, topic=topic, group=unique("g"), schema=leased.schema)
        env.update(leased.settings, CDC_LOG__LEVEL="info", CDC_VAULT__TIMEOUT_SECONDS="1")
        env["CDC_VAULT__ADDR"] = f"http://{proxy.address}"
        log_path = tmp_path / "worker.log"
        await produce(stack.kafka, topic, [insert(i, keyspace) for i in range(100)])
        worker = start_worker_process(env, log_path, stop_when_caught_up=False)
        try:
            async with asyncio.timeout(60):
                while await applied(admin_dsn, leased.schema) < 100:
                    await asyncio.sleep(0.2)
            await proxy.refuse()
            proxy.cut()
            await produce(stack.kafka, topic, [insert(i, keyspace) for i in range(100, 150)])
            async with asyncio.timeout(60):
                while worker.poll() is None:
                    await asyncio.sleep(0.2)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        lines = json_lines(log_path.read_text())
        assert worker.returncode == 1, log_path.read_text()[-3000:]
        assert any(line["event"] == "vault_renewal_failed" for line in lines)
        [fatal] = [line for line in lines if line["event"] == "fatal"]
        assert "the PostgreSQL login leased from Vault has expired" in fatal["error"]
        committed = await applied(admin_dsn, leased.schema)
        rows = await fetch_value(admin_dsn, f'SELECT count(*) FROM "{leased.schema}".cdc_model')
        assert rows == committed >= 100


async def test_a_new_login_reconnects_the_idle_pooled_connections_at_once(
    stack: Endpoints, unique: Callable[[str], str]
) -> None:
    """Idle pooled connections of the old user would otherwise wait, logged in, until next
    taken (asyncpg replaces them only then): after the switch none is left."""
    admin_dsn = stack["CDC_STACK_POSTGRES_ADMIN_DSN"]
    old, new = unique("old"), unique("new")
    for role in (old, new):
        await fetch_value(admin_dsn, f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'")
    login = PostgresLogin(load_config({"CDC_POSTGRES__DSN": admin_dsn}))
    login.user, login.password = old, Secret(f"pw-{old}")
    pool = login.watch(await asyncpg.create_pool(connect=login.connect, min_size=3, max_size=3))
    try:
        sessions = "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}'"
        assert await fetch_value(admin_dsn, sessions.format(old)) == 3
        login.user, login.password = new, Secret(f"pw-{new}")
        await reconnect_idle(pool)
        assert await fetch_value(admin_dsn, sessions.format(old)) == 0
        assert await fetch_value(admin_dsn, sessions.format(new)) == 3
    finally:
        await pool.close()
        for role in (old, new):
            await fetch_value(admin_dsn, f"DROP ROLE {role}")
