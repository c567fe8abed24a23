"""The whole pipeline with Debezium's own connector: CQL writes to Cassandra → the Debezium
Cassandra 5 agent of the local stack (reading the node's cdc_raw) → Kafka → the sink →
PostgreSQL, then reconciliation proves PostgreSQL equals what Cassandra returns.

Every other test feeds the sink events built from the connector's documented format; these
feed it what the connector really writes (JsonConverter with schemas, exact decimals and
varints as strings)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cassandra.cluster import Session

from tests.support import recon_data as data
from tests.support.names import Unique
from tests.support.pipeline import (
    create_topic,
    dead_letters,
    read_topic,
    run_cli,
    run_worker,
    sink_env,
)
from tests.support.stack import Endpoints, stack_command

# The agent (Debezium 3.4.1.Final) fails to register a table with a UDT column ("Unknown type"
# in its log) and then never emits that table's changes: the table here has every other type.
UDT_COLUMNS = ("addr", "f_addr", "l_addr")
TABLE_CQL = (
    re.sub(
        r"\s*(addr address|f_addr frozen<address>|l_addr list<frozen<address>>),",
        "",
        data.TABLE_CQL,
    )
    + " WITH cdc = true"
)
EVENT_WAIT_SECONDS = 120


@pytest.fixture
def connector(stack: Endpoints) -> str:
    """The agent's topic prefix; the stack's endpoints name it when the stack runs the agent."""
    prefix = stack.get("CDC_STACK_DEBEZIUM_TOPIC_PREFIX")
    if not prefix:
        pytest.skip("this stack runs no Debezium agent (deploy/local/stack does)")
    return prefix


def without_udts(row: data.Row) -> data.Row:
    return dataclasses.replace(
        row, driver={k: v for k, v in row.driver.items() if k not in UDT_COLUMNS}
    )


@pytest.fixture
def cassandra(stack: Endpoints) -> Iterator[Session]:
    session = data.cassandra_session(stack)
    yield session
    session.cluster.shutdown()


def flush(stack: Endpoints) -> None:
    """Flush Cassandra's memtables. The agent reads commit log segments in order and leaves
    one only when Cassandra marks it COMPLETED, once every memtable holding its writes has
    been flushed: until then, writes in later segments wait. A keyspace dropped while the
    flush goes through them all fails it: flush again."""
    for _ in range(5):
        done = subprocess.run(
            [*stack.nodetool, "flush"], capture_output=True, text=True, timeout=120
        )
        if "does not exist" not in done.stdout:
            break
    assert done.returncode == 0, done.stdout + done.stderr


async def wait_for_events(
    stack: Endpoints, topic: str, writes: int, settle: float | None = None
) -> int:
    """Wait until the topic holds an event for each of `writes` mutations, or with `settle`,
    until no new one has come for that many seconds; how many it holds. The agent may send
    one twice (it re-reads a segment once Cassandra completes it, and its offsets lag): a
    copy has the same commit log position, and the sink applies it once."""
    deadline = time.monotonic() + EVENT_WAIT_SECONDS
    seen: set[tuple[str, int]] = set()
    changed = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.to_thread(flush, stack)
        for _ in range(20):
            records = await read_topic(stack.kafka, topic)
            source = (json.loads(r.value)["payload"]["source"] for r in records)
            now = {(s["file"], s["pos"]) for s in source}
            if len(now) != len(seen):
                seen, changed = now, time.monotonic()
            if len(seen) >= writes:
                assert len(seen) == writes, f"{topic}: {len(seen)} mutations, {writes} writes"
                return writes
            if settle is not None and time.monotonic() - changed > settle:
                return len(seen)
            await asyncio.sleep(0.5)
    pytest.fail(
        f"{topic} holds events of {len(seen)} of {writes} writes after {EVENT_WAIT_SECONDS}s: "
        "see the agent's log, deploy/local/stack logs debezium"
    )


async def agent_hears(stack: Endpoints, cql: str, session: Session, logged: str) -> None:
    """Run a schema change and wait until the agent's log says it has applied it. It learns
    of schema changes from the driver's events, and for good skips the writes it reads
    before then (nothing else tells when that is)."""
    log = Path(stack["CDC_STACK_HOME"]) / "run" / "debezium" / "service.log"
    start = log.stat().st_size
    session.execute(cql)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with log.open("rb") as lines:
            lines.seek(start)
            if logged.encode() in lines.read():
                return
        await asyncio.sleep(0.2)
    pytest.fail(f"the agent's log ({log}) has no {logged!r} 60 s after: {cql}")


async def create_table(stack: Endpoints, session: Session, keyspace: str, cql: str) -> None:
    # Created within the driver's schema-event window (1 s) of its keyspace, the table would
    # be missed: the agent hears of the keyspace only, and never emits the table's changes.
    await agent_hears(
        stack,
        f"CREATE KEYSPACE {keyspace} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        session,
        f"Added keyspace [CREATE KEYSPACE {keyspace} ",
    )
    table = re.search(r"CREATE TABLE (\S+) \(", cql)
    assert table
    # Left to the agent's producer, the topic is created by its first record, and a partition
    # whose leader the producer has not learnt yet held its records until they expired (once,
    # 120 s later): the topic exists, with its partitions led, before the table takes writes.
    await create_topic(stack.kafka, f"{stack['CDC_STACK_DEBEZIUM_TOPIC_PREFIX']}.{table[1]}")
    await agent_hears(stack, cql, session, f"Added table [CREATE TABLE {table[1]} (")


def reconcile(env: dict[str, str], *args: str) -> str:
    done = run_cli({**env, "CDC_LOG__LEVEL": "warning"}, "reconcile", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def checksum_job(env: dict[str, str]) -> tuple[int, dict[str, int]]:
    """Run a checksum job over the whole table: its id, and its Cassandra rows, PostgreSQL
    rows and mismatches."""
    out = reconcile(env, "run", "--table", data.TARGET, "--strategy", "checksum")
    job = re.search(r"^job (\d+): checksum of \S+: succeeded$", out, re.MULTILINE)
    assert job, out
    counts = re.search(r"cassandra rows (\d+), postgres rows (\d+), mismatches (\d+),", out)
    assert counts, out
    cassandra, postgres, mismatches = map(int, counts.groups())
    return int(job[1]), {"cassandra": cassandra, "postgres": postgres, "mismatches": mismatches}


def checksum(env: dict[str, str], rows: int, mismatches: int) -> int:
    """Run a checksum job, check its counts (as many rows on both sides); the job's id."""
    job, counts = checksum_job(env)
    assert counts == {"cassandra": rows, "postgres": rows, "mismatches": mismatches}, counts
    return job


async def test_cassandra_writes_reach_postgres_through_the_real_connector(
    stack: Endpoints, connector: str, cassandra: Session, unique: Unique
) -> None:
    """Inserts of every type (edge values included), partial updates, nulls, a TTL, row,
    partition and range deletes and a whole-collection overwrite, written with CQL: after the
    sink has applied what the agent produced, a checksum job finds no difference."""
    keyspace, schema = unique.keyspace("dbz"), unique.schema("dbz")
    topic = f"{connector}.{keyspace}.{data.TABLE}"
    env = sink_env(
        stack,
        topic=re.escape(topic),
        group=unique("g"),
        schema=schema,
        pushgateway__url="",
    )
    await create_table(stack, cassandra, keyspace, TABLE_CQL.format(ks=keyspace))
    # Rows i and i + 1000k share a partition (id = i % 1000): partitions 10 and 11 get more
    # than one row, for the partition and range deletes.
    numbers = [*range(300), 1010, 1011, 2011, 3011]
    rows = [without_udts(data.make_row(i)) for i in numbers]
    data.load_cassandra(cassandra, keyspace, rows)
    writes = len(rows) + apply_changes(cassandra, keyspace, rows)
    await wait_for_events(stack, topic, writes)

    worker = await run_worker(env)
    assert worker.applied_events >= writes
    assert await dead_letters(stack.postgres_dsn, schema) == 0
    # 304 rows, less one row delete, a partition delete of 2 and a range delete of 2
    checksum(env, rows=299, mismatches=0)
    await check_ttl(stack.postgres_dsn, schema, rows[5].key)

    # An element added to a non-frozen set arrives as that element alone: the column then
    # holds it only (README, "Collections"); reconciliation finds the row and repairs it.
    table = f"{keyspace}.{data.TABLE}"
    cassandra.execute(
        f"UPDATE {table} SET s_text = s_text + {{'added'}} "
        "WHERE id = %s AND region = %s AND seq = %s",
        list(rows[7].key.values()),
    )
    await wait_for_events(stack, topic, writes + 1)
    await run_worker(env)
    job = checksum(env, rows=299, mismatches=1)
    assert "repaired 1" in reconcile(env, "repair", "--job", str(job))
    checksum(env, rows=299, mismatches=0)


async def test_a_column_added_in_cassandra_is_added_in_postgres(
    stack: Endpoints, connector: str, cassandra: Session, unique: Unique
) -> None:
    """ALTER TABLE … ADD in Cassandra: the agent's events gain the column, the sink adds it
    to the target table, and rows written before and after match Cassandra's."""
    keyspace, schema = unique.keyspace("dbz"), unique.schema("dbz")
    table = f"{keyspace}.{data.TABLE}"
    topic = f"{connector}.{table}"
    env = sink_env(
        stack, topic=re.escape(topic), group=unique("g"), schema=schema, pushgateway__url=""
    )
    await create_table(
        stack,
        cassandra,
        keyspace,
        f"CREATE TABLE {table} (id int, region text, seq timeuuid, t_text text, "
        "PRIMARY KEY ((id, region), seq)) WITH cdc = true",
    )
    insert = f"INSERT INTO {table} (id, region, seq, t_text) VALUES (%s, 'r', now(), %s)"
    for i in range(3):
        cassandra.execute(insert, [i, f"before {i}"])
    await wait_for_events(stack, topic, 3)
    await run_worker(env)
    await agent_hears(
        stack,
        f"ALTER TABLE {table} ADD (t_new map<text, int>, t_num varint)",
        cassandra,
        f"Updated table [CREATE TABLE {table} (",
    )
    # a row made by UPDATE with only the new columns, and an INSERT with one of them
    cassandra.execute(
        f"UPDATE {table} SET t_new = {{'a': 1}}, t_num = %s "
        "WHERE id = 0 AND region = 'r' AND seq = now()",
        [10**22],
    )
    cassandra.execute(
        f"INSERT INTO {table} (id, region, seq, t_text, t_new) "
        "VALUES (3, 'r', now(), 'after', {'b': 2})"
    )
    await wait_for_events(stack, topic, 5)
    await run_worker(env)
    assert await dead_letters(stack.postgres_dsn, schema) == 0
    conn = await asyncpg.connect(stack.postgres_dsn)
    try:
        added = await conn.fetch(
            f'SELECT t_new, t_num FROM "{schema}".{data.TARGET} WHERE t_new IS NOT NULL ORDER BY id'
        )
    finally:
        await conn.close()
    assert [(json.loads(r["t_new"]), r["t_num"]) for r in added] == [
        ({"a": 1}, 10**22),
        ({"b": 2}, None),
    ]
    checksum(env, rows=5, mismatches=0)


async def test_what_the_agent_loses_when_killed_is_found_and_repaired_by_reconciliation(
    stack: Endpoints, connector: str, cassandra: Session, unique: Unique
) -> None:
    """The agent killed (SIGKILL) while it streams 3,000 inserts, and started again. It may
    send events twice, and it may lose some for good (4, 148 and 370 of 3,000 in three trials
    that killed it 2-3 s into the load; none in most runs of this test). The sink applies what
    arrives; a checksum job finds exactly the rows whose events never came, repair copies
    them from Cassandra, and the next job finds no difference."""
    keyspace, schema = unique.keyspace("dbz"), unique.schema("dbz")
    topic = f"{connector}.{keyspace}.{data.TABLE}"
    env = sink_env(
        stack, topic=re.escape(topic), group=unique("g"), schema=schema, pushgateway__url=""
    )
    await create_table(stack, cassandra, keyspace, TABLE_CQL.format(ks=keyspace))
    rows = [without_udts(data.make_row(i)) for i in range(3000)]
    loading = asyncio.create_task(asyncio.to_thread(data.load_cassandra, cassandra, keyspace, rows))
    await asyncio.sleep(2.5)  # the agent is streaming them
    await asyncio.to_thread(stack_command, stack, "restart", "--immediate", "debezium")
    await loading
    await wait_for_events(stack, topic, len(rows), settle=20)

    await run_worker(env)
    assert await dead_letters(stack.postgres_dsn, schema) == 0
    job, counts = checksum_job(env)
    lost = len(rows) - counts["postgres"]
    # every difference is a row whose event never came; none holds a wrong value
    assert counts == {"cassandra": len(rows), "postgres": len(rows) - lost, "mismatches": lost}
    if lost:
        assert f"repaired {lost}" in reconcile(env, "repair", "--job", str(job))
    checksum(env, rows=len(rows), mismatches=0)


COLLECTIONS_CQL = (
    "CREATE TABLE {table} (k int PRIMARY KEY, v int, l list<int>, s set<text>, "
    "m map<text, int>, fl frozen<list<int>>, fs frozen<set<text>>) WITH cdc = true"
)
# key -> statements, each {t} (the table) and USING TIMESTAMP {ts} plus an offset in µs
EMPTYING: dict[int, list[tuple[str, int]]] = {
    # rows with no other live cell: Cassandra returns none of them
    1: [("UPDATE {t} USING TIMESTAMP {ts} SET l = null WHERE k = 1", 0)],
    2: [("UPDATE {t} USING TIMESTAMP {ts} SET s = {{}} WHERE k = 2", 0)],
    3: [("UPDATE {t} USING TIMESTAMP {ts} SET l = [] WHERE k = 3", 0)],
    4: [("UPDATE {t} USING TIMESTAMP {ts} SET m = {{}} WHERE k = 4", 0)],
    5: [("DELETE l FROM {t} USING TIMESTAMP {ts} WHERE k = 5", 0)],
    6: [
        ("UPDATE {t} USING TIMESTAMP {ts} SET l = [1], s = {{'a'}}, m = {{'a': 1}} WHERE k = 6", 0),
        ("UPDATE {t} USING TIMESTAMP {ts} SET l = null, s = {{}}, m = {{}} WHERE k = 6", 1),
    ],
    12: [("UPDATE {t} USING TIMESTAMP {ts} SET fl = null WHERE k = 12", 0)],
    # the same microsecond: `DELETE l` deletes what was written at it
    14: [
        ("UPDATE {t} USING TIMESTAMP {ts} SET l = [6] WHERE k = 14", 0),
        ("DELETE l FROM {t} USING TIMESTAMP {ts} WHERE k = 14", 0),
    ],
    # the older write reaches Cassandra (and the agent) after the deletion
    15: [
        ("UPDATE {t} USING TIMESTAMP {ts} SET s = null WHERE k = 15", 5),
        ("UPDATE {t} USING TIMESTAMP {ts} SET s = {{'old'}} WHERE k = 15", 0),
    ],
    # rows a row marker or another cell keeps
    7: [
        ("INSERT INTO {t} (k, l) VALUES (7, [1]) USING TIMESTAMP {ts}", 0),
        ("UPDATE {t} USING TIMESTAMP {ts} SET l = null WHERE k = 7", 1),
    ],
    8: [("INSERT INTO {t} (k, v, l) VALUES (8, 1, []) USING TIMESTAMP {ts}", 0)],
    9: [("UPDATE {t} USING TIMESTAMP {ts} SET v = 1, m = {{}} WHERE k = 9", 0)],
    # `SET l = null` beside another cell deletes one microsecond below its timestamp
    13: [
        ("UPDATE {t} USING TIMESTAMP {ts} SET v = 1, l = null WHERE k = 13", 0),
        ("UPDATE {t} USING TIMESTAMP {ts} SET l = l + [5] WHERE k = 13", 0),
    ],
    # empty frozen collections are values
    10: [("UPDATE {t} USING TIMESTAMP {ts} SET fl = [] WHERE k = 10", 0)],
    11: [("UPDATE {t} USING TIMESTAMP {ts} SET fs = {{}}, fl = null WHERE k = 11", 0)],
}
NONE = {"v": None, "l": None, "s": None, "m": None, "fl": None, "fs": None}
KEPT = {
    7: NONE,
    8: {**NONE, "v": 1},
    9: {**NONE, "v": 1},
    10: {**NONE, "fl": []},
    11: {**NONE, "fs": []},
    13: {**NONE, "v": 1, "l": [5]},
}


def comparable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row of either side in plain values: sets sorted, maps as dicts (jsonb parsed)."""

    def plain(name: str, value: Any) -> Any:
        if value is None or name == "v":
            return value
        if name == "m":
            return json.loads(value) if isinstance(value, str) else dict(value)
        return sorted(value) if name in ("s", "fs") else list(value)

    return {name: plain(name, row[name]) for name in NONE}


async def test_emptied_collections_leave_the_rows_cassandra_returns(
    stack: Endpoints, connector: str, cassandra: Session, unique: Unique
) -> None:
    """`SET c = null`, `= {}`, `= []` and `DELETE c` on non-frozen collections reach the sink
    as empty collections: a row with no other live cell is absent from PostgreSQL as from
    Cassandra's SELECT (also when an older write comes after, or one at the same
    microsecond), a row kept by its marker or another cell has the column null, and empty
    frozen collections are values. Applied a second time, nothing changes."""
    keyspace, schema = unique.keyspace("dbz"), unique.schema("dbz")
    table = f"{keyspace}.colls"
    topic = f"{connector}.{table}"
    env = sink_env(
        stack, topic=re.escape(topic), group=unique("g"), schema=schema, pushgateway__url=""
    )
    await create_table(stack, cassandra, keyspace, COLLECTIONS_CQL.format(table=table))
    ts = time.time_ns() // 1000
    statements = [
        cql.format(t=table, ts=ts + offset)
        for writes in EMPTYING.values()
        for cql, offset in writes
    ]
    for cql in statements:
        cassandra.execute(cql)
    found = cassandra.execute(f"SELECT * FROM {table}")
    selected = {r.k: comparable(r._asdict()) for r in found}
    assert selected == KEPT
    await wait_for_events(stack, topic, len(statements))

    for group in ("g1", "g2"):  # the second group applies every event once more
        await run_worker({**env, "CDC_KAFKA__GROUP_ID": unique(group)})
        assert await dead_letters(stack.postgres_dsn, schema) == 0
        conn = await asyncpg.connect(stack.postgres_dsn)
        try:
            stored = await conn.fetch(f'SELECT * FROM "{schema}".cdc_colls')
        finally:
            await conn.close()
        assert {r["k"]: comparable(r) for r in stored} == selected


def apply_changes(session: Session, keyspace: str, rows: list[data.Row]) -> int:
    """Changes on top of the loaded rows, as applications make them; how many writes."""
    table = f"{keyspace}.{data.TABLE}"
    where = "WHERE id = %s AND region = %s AND seq = %s"

    def key(i: int) -> list[Any]:
        return list(rows[i].key.values())

    statements: list[tuple[str, list[Any]]] = [
        (f"UPDATE {table} SET t_text = 'partial ✓', t_big = 42 {where}", key(1)),
        (f"UPDATE {table} SET t_dec = null, t_varint = null, l_int = null {where}", key(2)),
        (f"UPDATE {table} SET s_text = {{'whole'}}, m_text_int = {{'z': 26}} {where}", key(3)),
        (f"DELETE FROM {table} {where}", key(4)),
        (f"UPDATE {table} USING TTL 3600 SET t_ascii = 'expires' {where}", key(5)),
        (f"DELETE t_double, f_map FROM {table} {where}", key(6)),
    ]
    # a partition delete (the two rows of partition 10) and a range delete (two of the four
    # rows of partition 11, in Cassandra's clustering order: a timeuuid sorts by its time)
    statements.append((f"DELETE FROM {table} WHERE id = %s AND region = %s", key(10)[:2]))
    seqs = sorted((r.key["seq"] for r in rows if r.key["id"] == 11), key=lambda u: u.time)
    assert len(seqs) == 4
    low, high = seqs[0], seqs[2]
    statements.append(
        (
            f"DELETE FROM {table} WHERE id = %s AND region = %s AND seq >= %s AND seq < %s",
            [*key(11)[:2], low, high],
        )
    )
    for cql, params in statements:
        session.execute(cql, params)
    return len(statements)


async def check_ttl(dsn: str, schema: str, key: dict[str, Any]) -> None:
    """The TTL written in Cassandra is the row's expiry time in PostgreSQL."""
    conn = await asyncpg.connect(dsn)
    try:
        left = await conn.fetchval(
            f"SELECT extract(epoch FROM _cdc_expires_at - now()) FROM "
            f'"{schema}".{data.TARGET} WHERE id = $1 AND region = $2 AND seq = $3',
            *key.values(),
        )
    finally:
        await conn.close()
    assert left is not None
    assert 3000 < left <= 3600
