"""The demo's real path: CQL writes into the stack's Cassandra, which its Debezium agent captures.

`workload` is pure: a seeded list of CQL statements over the `shop` tables (inserts, partial
updates, nulls, whole-collection overwrites, row, range and partition deletes, TTLs). The rest
is thin I/O: a Cassandra session, table creation that waits until the agent has heard of it,
`nodetool flush` (the agent reads a commit log segment only once Cassandra has completed it)
and a checksum reconciliation job run with the sink's own command line.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from cassandra.util import uuid_from_time

from cdc_synth import synth

Statement = tuple[str, tuple[Any, ...]]
HEAR_TIMEOUT_S = 60.0


class CaptureError(Exception):
    """The real path cannot run or did not finish; the message says why."""


def workload(keyspace: str, seed: int = 7, customers: int = 120) -> list[Statement]:
    """The statements to write, in order. Each one is one mutation, hence one change event."""
    rng = random.Random(seed)  # noqa: S311 - demo data, not security
    at = datetime(2026, 1, 1, tzinfo=UTC)
    users = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(customers * 2)]
    statements: list[Statement] = []

    def add(cql: str, params: tuple[Any, ...]) -> None:
        statements.append((cql, params))

    for n, user in enumerate(users):
        add(
            f"INSERT INTO {keyspace}.users (user_id, email, name, created_at, balance, tags, "
            "prefs, last_ip) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                user,
                f"user{n}@example.com",
                f"User {n}",
                at + timedelta(minutes=n),
                Decimal(rng.randrange(100_000)) / 100,
                {rng.choice(["new", "vip", "beta", "eu"]) for _ in range(2)},
                {"lang": rng.choice(["en", "de", "fr"])},
                f"10.0.{n // 250}.{n % 250}",
            ),
        )
    for user in rng.sample(users, len(users) // 2):
        add(
            f"UPDATE {keyspace}.users SET balance = %s, email = %s WHERE user_id = %s",
            (Decimal(rng.randrange(100_000)) / 100, f"{user.hex[:8]}@example.org", user),
        )
    for user in rng.sample(users, len(users) // 10):
        add(f"UPDATE {keyspace}.users SET name = null WHERE user_id = %s", (user,))
    for user in rng.sample(users, len(users) // 10):
        tags = {"moved", rng.choice(["vip", "churned"])}
        add(f"UPDATE {keyspace}.users SET tags = %s WHERE user_id = %s", (tags, user))
    for user in rng.sample(users, len(users) // 20):
        add(f"DELETE FROM {keyspace}.users WHERE user_id = %s", (user,))

    orders: dict[uuid.UUID, list[uuid.UUID]] = {}
    for n, customer in enumerate(users[:customers]):
        for k in range(3):
            order = uuid_from_time(at + timedelta(hours=n, minutes=k), node=n, clock_seq=k)
            orders.setdefault(customer, []).append(order)
            add(
                f"INSERT INTO {keyspace}.orders (customer_id, order_id, status, total, "
                "items, placed_at) VALUES (%s, %s, 'placed', %s, %s, %s)",
                (
                    customer,
                    order,
                    Decimal(rng.randrange(1, 50_000)) / 100,
                    [f"sku-{rng.randrange(1000)}" for _ in range(rng.randint(1, 3))],
                    at + timedelta(hours=n, minutes=k),
                ),
            )
    for customer, placed in rng.sample(sorted(orders.items()), customers // 2):
        add(
            f"UPDATE {keyspace}.orders SET status = 'shipped' "
            "WHERE customer_id = %s AND order_id = %s",
            (customer, placed[0]),
        )
    doomed = rng.sample(sorted(orders), 6)
    for customer in doomed[:3]:
        add(f"DELETE FROM {keyspace}.orders WHERE customer_id = %s", (customer,))
    for customer in doomed[3:]:
        add(
            f"DELETE FROM {keyspace}.orders WHERE customer_id = %s AND order_id > %s",
            (customer, orders[customer][0]),
        )
    for n in range(customers):
        add(
            f"INSERT INTO {keyspace}.sessions (session_id, user_id, started_at, duration_ms, "
            "device) VALUES (%s, %s, %s, %s, %s) USING TTL 86400",
            (
                uuid.UUID(int=rng.getrandbits(128), version=4),
                rng.choice(users),
                at + timedelta(seconds=n),
                rng.randrange(1, 3_600_000),
                rng.choice(["ios", "android", "web"]),
            ),
        )
    return statements


def cassandra_session(env: dict[str, str]) -> Any:
    """A session on the stack's Cassandra (the caller shuts its cluster down)."""
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy

    policy = DCAwareRoundRobinPolicy(env.get("CDC_CASSANDRA__LOCAL_DC", "datacenter1"))
    user = env.get("CDC_CASSANDRA__USERNAME")
    auth = PlainTextAuthProvider(user, env["CDC_CASSANDRA__PASSWORD"]) if user else None
    cluster = Cluster(
        env["CDC_CASSANDRA__CONTACT_POINTS"].split(","),
        port=int(env["CDC_CASSANDRA__PORT"]),
        execution_profiles={EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=policy)},
        protocol_version=5,
        auth_provider=auth,
    )
    return cluster.connect()


async def create_tables_heard(session: Any, keyspace: str, agent_log: Path) -> None:
    """Create the keyspace and the `shop` tables (cdc=true), one at a time, each once the agent
    has logged the one before: it learns of schema changes from the driver's events and for
    good skips a new table's writes it reads before then (a table created within a second of
    its keyspace is never heard of at all)."""
    for statement in synth.cql_ddl(keyspace):
        created = re.search(r"CREATE (KEYSPACE|TABLE) IF NOT EXISTS (\S+) ", statement)
        assert created
        kind, name = created.groups()
        heard = f"Added {kind.lower()} [CREATE {kind} {name} "
        start = _size(agent_log)
        await asyncio.to_thread(session.execute, statement)
        deadline = time.monotonic() + HEAR_TIMEOUT_S
        while heard.encode() not in _read_from(agent_log, start):
            if time.monotonic() > deadline:
                raise CaptureError(
                    f"the Debezium agent has not picked up {name} after {HEAR_TIMEOUT_S:.0f} s: "
                    f"see {agent_log}"
                )
            await asyncio.sleep(0.2)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _read_from(path: Path, offset: int) -> bytes:
    with path.open("rb") as lines:
        lines.seek(offset)
        return lines.read()


def flush(stack_script: Path) -> None:
    """Flush Cassandra's memtables, so that the commit log segments holding the writes are
    completed and the agent reads them. A keyspace dropped meanwhile fails one: try again."""
    for _ in range(5):
        done = subprocess.run(
            [str(stack_script), "nodetool", "flush"], capture_output=True, text=True, timeout=120
        )
        if done.returncode == 0:
            return
    raise CaptureError(f"nodetool flush failed: {done.stdout[-500:]}{done.stderr[-500:]}")


@dataclass(frozen=True)
class Checksum:
    """One checksum reconciliation job's outcome."""

    table: str
    job: int
    cassandra_rows: int
    postgres_rows: int
    mismatches: int


def checksum(env: dict[str, str], table: str) -> Checksum:
    """Run `python -m cdc_sink reconcile run --strategy checksum` on one target table."""
    command = ["reconcile", "run", "--table", table, "--strategy", "checksum"]
    done = subprocess.run(
        [sys.executable, "-m", "cdc_sink", *command],
        env={**env, "CDC_LOG__LEVEL": "warning"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    job = re.search(r"^job (\d+): checksum of \S+: succeeded$", done.stdout, re.MULTILINE)
    counts = re.search(r"cassandra rows (\d+), postgres rows (\d+), mismatches (\d+),", done.stdout)
    if done.returncode != 0 or not job or not counts:
        raise CaptureError(f"the checksum job on {table} failed: {done.stdout}{done.stderr}")
    cassandra, postgres, mismatches = map(int, counts.groups())
    return Checksum(table, int(job[1]), cassandra, postgres, mismatches)
