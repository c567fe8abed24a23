"""A target table dropped by hand stops the worker; the README's steps rebuild it exactly."""

from __future__ import annotations

import asyncio

import asyncpg
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
from tests.support.recon_data import cassandra_session
from tests.support.stack import Endpoints

TS = 1_800_000_000_000_000
COLUMNS = ("v1", "v2", "v3")


def insert(i: int) -> Mutation:
    cells = {"v1": (i, None), "v2": (f"row {i}", None), "v3": (i * 7, None)}
    return Mutation("insert", TS + i, (i % 2, f"p{i % 3}", i, "x"), cells)


def write_to_cassandra(stack: Endpoints, keyspace: str, mutations: list[Mutation]) -> None:
    """What the application wrote, at the timestamps its change events carry."""
    session = cassandra_session(stack)
    try:
        for m in mutations:
            session.execute(
                f"INSERT INTO {keyspace}.model (p1, p2, c1, c2, v1, v2, v3) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s) USING TIMESTAMP {m.ts}",
                [*m.key, *(m.cells[c][0] for c in COLUMNS)],
            )
    finally:
        session.cluster.shutdown()


async def test_a_dropped_table_stops_the_worker_and_the_readme_steps_rebuild_it(
    stack: Endpoints, unique: Unique
) -> None:
    """30 rows applied; the table dropped; 10 more events stop the worker (exit 1, nothing
    committed, a message pointing at the README). After the README's steps the table holds
    the 10 new rows, and a checksum job plus its repair bring back the 30 from Cassandra."""
    keyspace, schema = unique.keyspace("ks"), unique.schema("dropped")
    topic = unique("cdc-events-dropped")
    create_cassandra_model_table(stack, keyspace)
    await create_topic(stack.kafka, topic)
    env = sink_env(stack, topic=topic, group=unique("g"), schema=schema)
    before, after = [insert(i) for i in range(30)], [insert(i) for i in range(30, 40)]
    expected = {m.key: {c: m.cells[c][0] for c in COLUMNS} for m in before + after}
    write_to_cassandra(stack, keyspace, before)
    await produce(stack.kafka, topic, [schemaless_record(m, keyspace) for m in before])
    await run_worker(env)

    conn = await asyncpg.connect(stack.postgres_dsn)
    try:
        await conn.execute(f'DROP TABLE "{schema}".cdc_model')
        write_to_cassandra(stack, keyspace, after)
        await produce(stack.kafka, topic, [schemaless_record(m, keyspace) for m in after])
        with pytest.raises(FatalError, match=r"42P01.*'A target table was dropped'"):
            await run_worker(env)
        stored = await conn.fetchval(f'SELECT sum(next_offset) FROM "{schema}"._cdc_checkpoints')
        assert stored == len(before)  # nothing of `after` was committed

        # The README's steps: forget the table, restart, repair from Cassandra.
        await conn.execute(
            f'DELETE FROM "{schema}"._cdc_schema_metadata WHERE target_table = $1', "cdc_model"
        )
    finally:
        await conn.close()
    await run_worker(env)
    rows = await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS)
    assert rows == {m.key: expected[m.key] for m in after}

    run = await asyncio.to_thread(
        run_cli, env, "reconcile", "run", "--table", "cdc_model", "--strategy", "checksum"
    )
    assert run.returncode == 0, run.stderr
    assert f"mismatches {len(before)}" in run.stdout, run.stdout
    job = run.stdout.split()[1].rstrip(":")
    repair = await asyncio.to_thread(run_cli, env, "reconcile", "repair", "--job", job)
    assert repair.returncode == 0, repair.stderr
    assert f"repaired {len(before)}" in repair.stdout, repair.stdout
    assert await read_rows(stack.postgres_dsn, schema, "cdc_model", COLUMNS) == expected
