"""Checksum reconciliation over a large table: wall time and peak memory.

    .venv/bin/python benchmarks/reconcile.py [--rows 1000000] [--buckets 4096] [--drift 0]
                                             [--keep KEYSPACE]

Loads --rows identical rows into a fresh Cassandra keyspace (driver, 256 in flight) and into a
fresh PostgreSQL schema the way the sink writes them (ChangeEvents → TableSchema.to_mutation →
PgWriter, 5,000 rows a transaction), optionally changes --drift rows in Cassandra, then runs
one checksum job in a child process (`--check`), so its peak RSS is the job's own and not the
loader's. Prints a JSON summary: load times, job wall time, rows/s, peak RSS of the job
process, mismatches found. The keyspace and schema are dropped afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.policies import WhiteListRoundRobinPolicy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cdc_recon.alerting import ReconMetrics  # noqa: E402
from cdc_recon.readers import connect_cassandra  # noqa: E402
from cdc_recon.service import Reconciler  # noqa: E402
from cdc_recon.settings import ReconciliationConfig  # noqa: E402
from cdc_sink.apply.writer import Batch, PgWriter, prepare_connection  # noqa: E402
from cdc_sink.config import CassandraConfig, Secret  # noqa: E402
from cdc_sink.model.cql import parse_cql_type  # noqa: E402
from cdc_sink.model.events import Cell, ChangeEvent, Op, Position  # noqa: E402
from cdc_sink.ops.migrate import migrate  # noqa: E402
from cdc_sink.schema.tables import TableSchema  # noqa: E402

TS0 = 1_700_000_000_000_000
COLUMNS = {
    "id": "bigint",
    "name": "text",
    "amount": "decimal",
    "score": "double",
    "created": "timestamp",
    "ref": "uuid",
    "tags": "set<text>",
}
CQL = (
    "CREATE TABLE {ks}.orders (id bigint PRIMARY KEY, name text, amount decimal, score double, "
    "created timestamp, ref uuid, tags set<text>)"
)


def _row(i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(driver values, Debezium values) of row i."""
    amount = Decimal(i) / 100
    sign, digits, exponent = amount.as_tuple()
    unscaled = int("".join(map(str, digits))) * (-1 if sign else 1)
    raw = unscaled.to_bytes((unscaled + (unscaled < 0)).bit_length() // 8 + 1, "big", signed=True)
    created_ms = 1_600_000_000_000 + i * 1000
    ref = uuid.UUID(int=i * 7919)
    tags = sorted({f"t{i % 10}", "all"})
    driver = {
        "id": i,
        "name": f"customer {i}",
        "amount": amount,
        "score": i / 3,
        "created": dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=created_ms),
        "ref": ref,
        "tags": set(tags),
    }
    debezium = {
        **driver,
        "amount": {"scale": -int(exponent), "value": raw},
        "created": created_ms,
        "ref": str(ref),
        "tags": tags,
    }
    return driver, debezium


def _cluster(host: str, port: int) -> Any:
    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy([host]), request_timeout=120
    )
    user = os.environ.get("CDC_CASSANDRA__USERNAME")  # the stack's Cassandra checks passwords
    return Cluster(
        [host],
        port=port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        protocol_version=5,
        auth_provider=(
            PlainTextAuthProvider(user, os.environ["CDC_CASSANDRA__PASSWORD"]) if user else None
        ),
    )


def load_cassandra(session: Any, keyspace: str, rows: int) -> None:
    statement = session.prepare(
        f"INSERT INTO {keyspace}.orders ({', '.join(COLUMNS)}) "
        f"VALUES ({', '.join('?' * len(COLUMNS))}) USING TIMESTAMP ?"
    )
    for start in range(0, rows, 20_000):
        params = [(*_row(i)[0].values(), TS0 + i) for i in range(start, min(rows, start + 20_000))]
        for ok, result in execute_concurrent_with_args(session, statement, params, concurrency=256):
            if not ok:
                raise RuntimeError(result)
        print(f"cassandra: {min(rows, start + 20_000)} rows", file=sys.stderr)


async def load_postgres(dsn: str, schema: str, keyspace: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    await prepare_connection(conn)
    await migrate(conn, schema)
    table = TableSchema(
        keyspace,
        "orders",
        "cdc_orders",
        ("id",),
        {n: parse_cql_type(t) for n, t in COLUMNS.items()},
        ("id",),
    )
    await conn.execute(table.create_sql(schema))
    await conn.execute(
        "INSERT INTO _cdc_schema_metadata (target_table, version, keyspace_name, source_table, "
        "key_columns, partition_columns, columns) VALUES ('cdc_orders', 1, $1, 'orders', "
        "'{id}', '{id}', $2::jsonb)",
        keyspace,
        json.dumps(COLUMNS),
    )
    writer = PgWriter(conn, schema, "bench")
    for start in range(0, rows, 5000):
        mutations = []
        for i in range(start, min(rows, start + 5000)):
            values = _row(i)[1]
            event = ChangeEvent(
                keyspace, "orders", Op.INSERT, {"id": i},
                {n: Cell(v, None) for n, v in values.items() if n != "id"},
                TS0 + i, False, Position("bench", 0, i),
            )  # fmt: skip
            mutations.append(table.to_mutation(event))
        await writer.apply(Batch(tables=[(table, mutations)]))
        if (start // 5000) % 20 == 0:
            print(f"postgres: {start + len(mutations)} rows", file=sys.stderr)
    await conn.close()


async def check(args: argparse.Namespace) -> dict[str, Any]:
    """Run one checksum job (in this process) and report it."""
    password = os.environ.get("CDC_CASSANDRA__PASSWORD")  # the stack's Cassandra checks it
    cassandra = CassandraConfig(
        contact_points=args.host,
        port=args.port,
        username=os.environ.get("CDC_CASSANDRA__USERNAME"),
        password=Secret(password) if password else None,
    )
    session = connect_cassandra(cassandra, "LOCAL_QUORUM")
    pool = await asyncpg.create_pool(
        args.dsn, min_size=1, max_size=4, server_settings={"search_path": args.schema},
        init=prepare_connection,
    )  # fmt: skip
    assert pool is not None
    # Unpaced: the benchmark measures how fast a job can read, not the budget a worker keeps.
    settings = ReconciliationConfig(
        buckets=args.buckets, page_size=5000, concurrency=4, max_rows_per_second=0
    )
    reconciler = Reconciler(
        pool, args.schema, session, settings, metrics=ReconMetrics(), pushgateway_url=None,
        owner="bench",
    )  # fmt: skip
    began = time.monotonic()
    job = await reconciler.run("cdc_orders", "checksum")
    elapsed = time.monotonic() - began
    await pool.close()
    session.cluster.shutdown()
    return {
        "job_seconds": round(elapsed, 1),
        "rows_per_s_per_side": round((job["cassandra_rows"] or 0) / elapsed),
        "status": job["status"],
        "error": job["error"],
        "cassandra_rows": job["cassandra_rows"],
        "postgres_rows": job["postgres_rows"],
        "mismatches": job["mismatches"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--buckets", type=int, default=4096)
    parser.add_argument("--drift", type=int, default=0, help="rows to change in Cassandra")
    parser.add_argument("--keep", action="store_true", help="keep the keyspace and schema")
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dsn = os.environ["CDC_POSTGRES__DSN"]
    args.host = os.environ.get("CDC_CASSANDRA__CONTACT_POINTS", "127.0.0.1")
    args.port = int(os.environ.get("CDC_CASSANDRA__PORT", "9042"))
    if args.check:
        print(json.dumps(asyncio.run(check(args))))
        return 0

    stamp = time.strftime("%Y%m%d%H%M%S")
    keyspace = args.schema = f"bench_recon_{stamp}"
    cluster = _cluster(args.host, args.port)
    session = cluster.connect()
    session.execute(
        f"CREATE KEYSPACE {keyspace} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    session.execute(CQL.format(ks=keyspace))
    summary: dict[str, Any] = {"rows": args.rows, "buckets": args.buckets, "drift": args.drift}
    try:
        began = time.monotonic()
        load_cassandra(session, keyspace, args.rows)
        summary["cassandra_load_s"] = round(time.monotonic() - began, 1)
        began = time.monotonic()
        asyncio.run(load_postgres(args.dsn, keyspace, keyspace, args.rows))
        summary["postgres_load_s"] = round(time.monotonic() - began, 1)
        for i in range(args.drift):
            row = (i * 7_919) % args.rows
            session.execute(
                f"UPDATE {keyspace}.orders USING TIMESTAMP {TS0 + 10**9} SET name = 'changed' "
                f"WHERE id = {row}"
            )
        command = [sys.executable, __file__, "--check", "--schema", keyspace]
        child = subprocess.run(
            [*command, "--buckets", str(args.buckets)], capture_output=True, text=True, check=False
        )
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        summary.update(json.loads(child.stdout.strip().splitlines()[-1]))
    finally:
        if not args.keep:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")

            async def drop() -> None:
                conn = await asyncpg.connect(args.dsn)
                await conn.execute(f'DROP SCHEMA IF EXISTS "{keyspace}" CASCADE')
                await conn.close()

            asyncio.run(drop())
        cluster.shutdown()
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
