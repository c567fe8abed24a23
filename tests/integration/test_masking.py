"""PII masking on the real stack: what the sink writes, logs and dead-letters, reconciliation of
masked tables, and re-masking the rows already written after a rule change."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cassandra.cluster import Session

from cdc_sink.errors import FatalError
from cdc_sink.model.masking import MaskingPolicy, hash_text, parse_rules, partial_text
from cdc_synth import synth
from tests.support import recon_data as data
from tests.support.names import Unique
from tests.support.pipeline import (
    cassandra_session,
    create_cassandra_table,
    create_topic,
    json_lines,
    json_with_schema,
    kill,
    produce,
    read_topic,
    run_cli,
    run_worker,
    sink_env,
    sql,
    start_worker_process,
    wait_for_applied,
)
from tests.support.prometheus import free_port
from tests.support.stack import REPO, Endpoints
from tests.support.vault import root_client

KEY = "m" * 32
MARKER = "[masked]"
USERS_RULES = (
    "shop.users.email=hash; shop.users.name=partial:first:2; shop.users.tags=redact; "
    "shop.users.prefs=null"
)
# A value PostgreSQL cannot store (NUL) in a masked column: the record is dead-lettered.
POISON_EMAIL = "poison\x00CLEAR-VALUE-7f3a@example.com"
TS0 = 1_800_000_000_000_000
PEOPLE_CQL = (
    "CREATE TABLE {ks}.people (id int PRIMARY KEY, email text, name text, tags set<text>, "
    "age int) WITH cdc = true"
)
PEOPLE_COLUMNS: dict[str, Any] = {
    "id": "int32",
    "email": "string",
    "name": "string",
    "tags": {"type": "array", "items": {"type": "string"}},
    "age": "int32",
}


def masking_env(rules: str) -> dict[str, str]:
    return {
        "masking__rules": rules,
        "masking__hash_key": KEY,
        "masking__marker": MARKER,
    }


def masked_user(cells: dict[str, Any]) -> dict[str, Any]:
    """What PostgreSQL must hold for a users row of these clear values under USERS_RULES."""
    email, name, tags = cells.get("email"), cells.get("name"), cells.get("tags")
    return {
        "email": None if email is None else hash_text(KEY.encode(), email),
        "name": None if name is None else partial_text(name, 2, False, MARKER),
        "tags": None if not tags else [MARKER] * len(tags),
        "prefs": None,
    }


def users_model(events: list[synth.SynthEvent]) -> dict[Any, dict[str, Any]]:
    """The users rows Cassandra holds after the events (each key's events are in order)."""
    rows: dict[Any, dict[str, Any]] = {}
    for e in events:
        if e.table != "users":
            continue
        key = e.key["user_id"]
        if e.op == "d":
            rows.pop(key, None)
        else:
            rows.setdefault(key, {}).update(e.cells)
    return rows


def clear_texts(events: list[synth.SynthEvent]) -> set[str]:
    """Every clear e-mail and name the events carry."""
    found = {POISON_EMAIL.split("\x00")[1]}
    for e in events:
        if e.table == "users":
            found |= {e.cells[c] for c in ("email", "name") if e.cells.get(c)}
    return found


def leaks(texts: set[str], haystack: str) -> list[str]:
    return sorted(t for t in texts if t in haystack)


async def test_masked_columns_never_reach_postgres_logs_or_dead_letters(
    stack: Endpoints, unique: Unique, tmp_path: Path
) -> None:
    """The generator's inserts, partial updates and deletes plus a record that fails on a
    masked column: PostgreSQL holds exactly the masked model, and no log line, DLQ header or
    `_cdc_dlq_records` text holds a clear e-mail or name (the DLQ topic keeps the record)."""
    events = synth.Generator(19, start_us=TS0).take(1500)
    poison = synth.SynthEvent(
        "users",
        "i",
        {"user_id": uuid.uuid4()},
        {"email": POISON_EMAIL, "name": "Poison Person"},
        events[-1].ts_us + 1,
    )
    prefix = unique("cdc-events-masked") + "-"
    dlq_topic = unique("dlq-masked")
    await synth.produce(stack.kafka, [*events, poison], "json", topic_prefix=prefix)
    schema = unique.schema("masked")
    env = sink_env(
        stack,
        topic=f"{prefix}.*",
        group=unique("group"),
        schema=schema,
        log__level="debug",
        dlq__topic=dlq_topic,
        **masking_env(USERS_RULES),
    )
    log_path = tmp_path / "worker.log"
    worker = start_worker_process(env, log_path)
    try:
        assert await asyncio.to_thread(worker.wait, 300) == 0, log_path.read_text()[-3000:]
    finally:
        kill(worker)

    rows = await sql(
        stack.postgres_dsn, schema, "SELECT user_id, email, name, tags, prefs FROM cdc_users"
    )
    stored = {
        r["user_id"]: {
            "email": r["email"],
            "name": r["name"],
            "tags": None if r["tags"] is None else sorted(r["tags"]),
            "prefs": r["prefs"],
        }
        for r in rows
    }
    assert stored == {k: masked_user(v) for k, v in users_model(events).items()}

    texts = clear_texts(events)
    log_text = log_path.read_text()
    assert len(json_lines(log_text)) > 10  # debug lines were written
    assert leaks(texts, log_text) == []
    dead = await sql(
        stack.postgres_dsn,
        schema,
        "SELECT id, source_topic, headers::text, error_class, error_message, stage "
        "FROM _cdc_dlq_records",
    )
    assert [d["error_class"] for d in dead] == ["ConversionError"]
    assert (
        "column 'email': text: PostgreSQL cannot store the NUL character"
        in (dead[0]["error_message"])
    )
    assert MARKER in dead[0]["error_message"]
    assert leaks(texts, " ".join(str(v) for d in dead for v in d.values())) == []
    [letter] = await read_topic(stack.kafka, dlq_topic)
    headers = " ".join(f"{k}={v.decode()}" for k, v in letter.headers)
    assert "cdc.error.message" in headers
    assert leaks(texts, headers) == []
    assert b"CLEAR-VALUE-7f3a" in letter.value  # the record itself, kept for replay


# --- a table of our own on both sides -----------------------------------------------------


def person(i: int) -> dict[str, Any]:
    return {
        "email": f"person{i}@example{i % 3}.org",
        "name": f"Person Number {i}",
        "tags": [f"tag{i % 4}", "common"],
        "age": 20 + i,
    }


class People:
    """The `people` table in a keyspace of its own: writes go to Cassandra (USING TIMESTAMP)
    and, as the agent would send them, to the topic."""

    def __init__(self, stack: Endpoints, unique: Unique) -> None:
        self.stack = stack
        self.keyspace = unique.keyspace("masked")
        self.topic = unique("cdc-events-people")
        self.ts = TS0
        create_cassandra_table(stack, self.keyspace, PEOPLE_CQL.format(ks=self.keyspace))
        self.session: Session = cassandra_session(stack)

    def close(self) -> None:
        self.session.cluster.shutdown()

    def rules(self, *rules: str) -> str:
        return "; ".join(f"{self.keyspace}.people.{rule}" for rule in rules)

    async def write(self, rows: dict[int, dict[str, Any]], op: str = "i") -> None:
        records = []
        for i, cells in rows.items():
            self.ts += 10
            names = ", ".join(cells)
            sets = ", ".join(f"{n} = %s" for n in cells)
            values = [set(v) if n == "tags" else v for n, v in cells.items()]
            if op == "i":
                self.session.execute(
                    f"INSERT INTO {self.keyspace}.people (id, {names}) VALUES "
                    f"(%s, {', '.join('%s' for _ in cells)}) USING TIMESTAMP {self.ts}",
                    [i, *values],
                )
            else:
                self.session.execute(
                    f"UPDATE {self.keyspace}.people USING TIMESTAMP {self.ts} SET {sets} "
                    "WHERE id = %s",
                    [*values, i],
                )
            records.append(_record(self.keyspace, {"id": i}, cells, op=op, ts_us=self.ts))
        await produce(self.stack.kafka, self.topic, records)

    def cassandra_rows(self) -> dict[int, dict[str, Any]]:
        rows = self.session.execute(f"SELECT id, email, name, tags FROM {self.keyspace}.people")
        return {
            r.id: {"email": r.email, "name": r.name, "tags": sorted(r.tags or [])} for r in rows
        }


def _record(
    keyspace: str, key: dict[str, Any], cells: dict[str, Any], *, op: str, ts_us: int
) -> tuple[bytes, bytes]:
    return json_with_schema(keyspace, "people", PEOPLE_COLUMNS, key, cells, op=op, ts_us=ts_us)


@pytest.fixture
def people(stack: Endpoints, unique: Unique) -> Iterator[People]:
    table = People(stack, unique)
    try:
        yield table
    finally:
        table.close()


async def stored_people(dsn: str, schema: str) -> dict[int, dict[str, Any]]:
    rows = await sql(dsn, schema, "SELECT id, email, name, tags FROM cdc_people")
    return {
        r["id"]: {"email": r["email"], "name": r["name"], "tags": sorted(r["tags"] or [])}
        for r in rows
    }


def recon_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = run_cli(env, "reconcile", *args)
    assert done.returncode in (0, 1), done.stderr
    return done


def mismatches(done: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    """(job id, mismatches) from `reconcile run`'s summary."""
    job = re.search(r"job (\d+):", done.stdout)
    found = re.search(r"mismatches (\d+)", done.stdout)
    assert job, done.stdout + done.stderr
    assert found, done.stdout + done.stderr
    return int(job[1]), int(found[1])


async def test_a_masked_table_reconciles_and_repairs_with_masked_values(
    stack: Endpoints, unique: Unique, people: People
) -> None:
    """Checksum reconciliation masks what it reads from Cassandra: zero differences on a
    masked table; a value changed behind the sink's back is exactly one difference, and its
    repair writes the masked value."""
    rules = people.rules("email=hash", "name=partial:last:3", "tags=redact")
    schema = unique.schema("maskrecon")
    env = sink_env(
        stack,
        topic=people.topic,
        group=unique("group"),
        schema=schema,
        **masking_env(rules),
    )
    await create_topic(stack.kafka, people.topic)
    await people.write({i: person(i) for i in range(40)})
    await run_worker(env)
    stored = await stored_people(stack.postgres_dsn, schema)
    assert stored[7] == {
        "email": hash_text(KEY.encode(), "person7@example1.org"),
        "name": f"{MARKER}r 7",
        "tags": [MARKER, MARKER],
    }

    assert differences(env, "cdc_people") == 0

    people.session.execute(
        f"UPDATE {people.keyspace}.people USING TIMESTAMP {people.ts + 1000} "
        "SET email = 'changed@elsewhere.net' WHERE id = 7"
    )
    assert await one_difference_repaired(env, stack.postgres_dsn, schema, "cdc_people") == (
        [7],
        ["email"],
    )
    stored = await stored_people(stack.postgres_dsn, schema)
    assert stored[7]["email"] == hash_text(KEY.encode(), "changed@elsewhere.net")
    assert differences(env, "cdc_people") == 0


def differences(env: dict[str, str], table: str) -> int:
    """The differences a checksum reconciliation of `table` finds."""
    return mismatches(recon_cli(env, "run", "--table", table, "--strategy", "checksum"))[1]


async def one_difference_repaired(
    env: dict[str, str], dsn: str, schema: str, table: str
) -> tuple[Any, list[str]]:
    """Checksum reconciliation of `table` finds exactly one row whose values differ, and its
    repair succeeds: (that row's key, the differing columns)."""
    job, found = mismatches(recon_cli(env, "run", "--table", table, "--strategy", "checksum"))
    assert found == 1
    [listed] = await sql(
        dsn,
        schema,
        "SELECT row_key, kind, columns FROM _cdc_reconciliation_mismatches WHERE job_id = $1",
        job,
    )
    assert listed["kind"] == "value_mismatch"
    repaired = recon_cli(env, "repair", "--job", str(job))
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    return json.loads(listed["row_key"]), list(listed["columns"])


def mask_apply(env: dict[str, str], *args: str, table: str = "cdc_people") -> dict[str, Any]:
    done = run_cli(env, "mask", "apply", "--table", table, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    outcome: dict[str, Any] = json.loads(done.stdout)
    return outcome


async def test_a_new_rule_rewrites_the_existing_rows_while_the_sink_streams(
    stack: Endpoints, unique: Unique, people: People, tmp_path: Path
) -> None:
    """A rule added to a table with rows: the sink restarted with it streams on while `mask
    apply` rewrites the rows in small batches; interrupted (--max-batches), it resumes where it
    stopped; afterwards every row equals the masked model of what Cassandra holds (a value it
    cannot store is emptied, not left in the clear), and the runs are in the audit log; a
    rotated hash key starts a new walk that rehashes every row."""
    schema = unique.schema("maskapply")
    base = sink_env(stack, topic=people.topic, group=unique("group"), schema=schema)
    await create_topic(stack.kafka, people.topic)
    await people.write({i: person(i) for i in range(120)})
    await run_worker({**base, **{f"CDC_{k.upper()}": v for k, v in masking_env("").items()}})
    before = await stored_people(stack.postgres_dsn, schema)
    assert before[3]["name"] == "Person Number 3"  # no rule yet: clear
    # Changed behind the sink to a value PostgreSQL cannot store: the clear one must go.
    people.session.execute(
        f"UPDATE {people.keyspace}.people USING TIMESTAMP {people.ts + 5} "
        "SET name = %s WHERE id = 3",
        ["Bad\x00Name"],
    )

    rules = people.rules("name=partial:first:3", "email=hash")
    env = {**base, **{f"CDC_{k.upper()}": v for k, v in masking_env(rules).items()}}
    log_path = tmp_path / "worker.log"
    worker = start_worker_process(env, log_path, stop_when_caught_up=False)
    try:
        first = mask_apply(env, "--batch-rows", "25", "--max-batches", "2")
        assert (first["rows_done"], first["finished"], first["resumed"]) == (50, False, False)
        progress = await sql(
            stack.postgres_dsn, schema, "SELECT last_key, rows_done FROM _cdc_mask_progress"
        )
        assert json.loads(progress[0]["last_key"]) == {"id": 49}
        halfway = await stored_people(stack.postgres_dsn, schema)
        assert halfway[10]["name"] == "Per" + MARKER
        assert halfway[100]["name"] == "Person Number 100"  # not reached yet

        # The sink streams meanwhile: new rows, and updates of rows before and after the cursor.
        await people.write({i: person(i) for i in range(120, 160)})
        await people.write(
            {5: {"name": "Renamed Early"}, 110: {"name": "Renamed Late", "age": 1}}, op="u"
        )
        second = mask_apply(env, "--batch-rows", "25")
        assert (second["finished"], second["resumed"]) == (True, True)
        assert second["rows_done"] >= 120
        await wait_for_applied(stack.postgres_dsn, schema, 120 + 40 + 2 - 1, worker)
        assert worker.poll() is None, log_path.read_text()[-3000:]
    finally:
        kill(worker)

    key = KEY.encode()
    expected = {
        i: {
            "email": hash_text(key, row["email"]),
            "name": None if "\x00" in row["name"] else partial_text(row["name"], 3, False, MARKER),
            "tags": row["tags"],
        }
        for i, row in people.cassandra_rows().items()
    }
    assert await stored_people(stack.postgres_dsn, schema) == expected
    assert expected[5]["name"] == "Ren" + MARKER
    assert expected[3]["name"] is None
    again = mask_apply(env)  # finished for these rules: nothing more to do
    assert (again["finished"], again["resumed"]) == (True, True)
    audited = await sql(
        stack.postgres_dsn,
        schema,
        "SELECT action, details FROM _cdc_audit_log WHERE action LIKE 'mask_apply%' ORDER BY id",
    )
    assert [r["action"] for r in audited] == [
        "mask_apply",
        "mask_apply",
        "mask_apply_finished",
        "mask_apply",
        "mask_apply_finished",
    ]
    assert json.loads(audited[0]["details"]) == {
        "table": "cdc_people",
        "columns": ["name", "email"],
    }

    rotated_key = "a rotated masking key, also 32 bytes or more"
    rotated = mask_apply({**env, "CDC_MASKING__HASH_KEY": rotated_key})
    assert (rotated["finished"], rotated["resumed"], rotated["rows_done"]) == (True, False, 160)
    clear = people.cassandra_rows()
    assert await stored_people(stack.postgres_dsn, schema) == {
        i: {**row, "email": hash_text(rotated_key.encode(), clear[i]["email"])}
        for i, row in expected.items()
    }


async def test_the_hash_key_may_come_from_vault_and_rules_that_do_not_fit_stop_the_sink(
    stack: Endpoints, unique: Unique, people: People
) -> None:
    """With CDC_VAULT__MASKING_KEY_SECRET the key is read from Vault KV v2; a malformed rule
    stops start-up (exit 2), a rule that does not fit the table stops the worker before a row
    is written, and `mask apply` refuses an unknown column, a rule that does not fit or a table
    without rules (exit 2), each naming the rule or column, and exits 1 when Cassandra cannot
    be reached."""
    schema = unique.schema("maskvault")
    base = sink_env(stack, topic=people.topic, group=unique("group"), schema=schema)
    await create_topic(stack.kafka, people.topic)
    await people.write({1: person(1)})

    bad = {**base, "CDC_MASKING__RULES": "people.email=hash"}
    refused = run_cli(bad, "run", "--stop-when-caught-up", timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "masking rule 'people.email=hash' is not `keyspace.table.column=method`" in (
        refused.stderr
    )

    unfit = {**base, "CDC_MASKING__RULES": people.rules("age=redact")}
    with pytest.raises(FatalError, match=rf"'{people.keyspace}\.people\.age=redact': redact fits"):
        await run_worker(unfit)
    assert await sql(stack.postgres_dsn, schema, "SELECT * FROM cdc_people") == []

    vault_key = "a masking key kept in vault, longer than 32 bytes"
    path = unique("masking-key")
    client = root_client(stack)
    await asyncio.to_thread(
        client.secrets.kv.v2.create_or_update_secret,
        path,
        secret={"secret": vault_key},
        mount_point="secret",
    )
    env = {
        **base,
        "CDC_MASKING__RULES": people.rules("email=hash"),
        "CDC_VAULT__ADDR": stack.vault_addr,
        "CDC_VAULT__TOKEN": stack.vault_token,
        "CDC_VAULT__MASKING_KEY_SECRET": path,
    }
    try:
        await run_worker(env)
        [row] = await sql(stack.postgres_dsn, schema, "SELECT email FROM cdc_people")
        assert row["email"] == hash_text(vault_key.encode(), person(1)["email"])
        refused = run_cli(env, "mask", "apply", "--table", "cdc_people", "--column", "nope")
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "cdc_people has no column 'nope'" in refused.stderr
        unfit = {**env, "CDC_MASKING__RULES": people.rules("age=redact")}
        refused = run_cli(unfit, "mask", "apply", "--table", "cdc_people")
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"masking rule '{people.keyspace}.people.age=redact': redact fits" in refused.stderr
        ruleless = run_cli(base, "mask", "apply", "--table", "cdc_people")
        assert ruleless.returncode == 2, ruleless.stderr[-2000:]
        assert "no masking rule names a column" in ruleless.stderr
        away = {**env, "CDC_CASSANDRA__PORT": str(free_port())}
        failed = run_cli(away, "mask", "apply", "--table", "cdc_people")
        assert failed.returncode == 1, failed.stderr[-2000:]
        assert "cdc-sink mask:" in failed.stderr
    finally:
        await asyncio.to_thread(
            client.secrets.kv.v2.delete_metadata_and_all_versions, path, mount_point="secret"
        )


async def test_masks_on_every_kind_of_column_reconcile_with_zero_differences(
    stack: Endpoints, unique: Unique
) -> None:
    """Text, ascii, varchar, a non-frozen set of text, fields of a non-frozen and of a frozen
    UDT (with a timestamp and decimals beside them) and whole columns set to null: what the
    sink writes holds no clear value, checksum reconciliation of the table finds nothing, a
    masked UDT field changed in Cassandra is exactly one difference, and repair writes it
    masked."""
    rules = (
        "t_text=hash; t_ascii=partial:first:3; t_varchar=redact; s_text=redact; "
        "addr.street=hash; f_addr.tags=redact; t_dec=null; m_text_int=null"
    )
    keyspace = unique.keyspace("recon")
    policy = MaskingPolicy(
        parse_rules("; ".join(f"{keyspace}.{data.TABLE}.{r}" for r in rules.split("; "))),
        KEY.encode(),
        MARKER,
    )
    setup_runs = data.make_setup(stack, unique, 300, masking=policy, keyspace=keyspace, buckets=16)
    setup = await anext(setup_runs)
    try:
        rec = setup.reconciler
        rows = await sql(
            stack.postgres_dsn,
            setup.schema,
            "SELECT t_text, t_ascii, t_varchar, s_text, addr, f_addr, t_dec, m_text_int "
            "FROM cdc_everything",
        )
        stored = json.dumps([{k: str(v) for k, v in r.items()} for r in rows], ensure_ascii=False)
        assert leaks({"héllo", " Main", "ascii-"}, stored) == []
        assert {r["t_dec"] for r in rows} == {None}
        assert {r["t_varchar"] for r in rows} == {MARKER}

        job = await rec.run(data.TARGET, "checksum")
        found = await rec.repository.mismatches(job=job["id"])
        assert (job["status"], job["mismatches"]) == ("succeeded", 0), [
            (m["columns"], m.get("cassandra_value"), m.get("postgres_value")) for m in found[:2]
        ]

        changed = setup.rows[42]
        where = " AND ".join(f"{k} = ?" for k in data.KEY)
        statement = setup.session.prepare(
            f"UPDATE {keyspace}.{data.TABLE} USING TIMESTAMP {changed.ts + 10**6} "
            f"SET addr.street = ? WHERE {where}"
        )
        setup.session.execute(statement, ["99 Hidden Lane", *changed.key.values()])
        job = await rec.run(data.TARGET, "checksum")
        found = await rec.repository.mismatches(job=job["id"])
        assert [(m["kind"], m["columns"]) for m in found] == [("value_mismatch", ["addr"])]
        assert "Hidden" not in json.dumps(found, default=str)
        summary = await rec.repair(job["id"])
        assert (summary.repaired, summary.unresolved) == (1, 0)
        [repaired] = await sql(
            stack.postgres_dsn,
            setup.schema,
            "SELECT addr ->> 'street' AS street FROM cdc_everything WHERE id = $1 AND seq = $2",
            changed.key["id"],
            changed.key["seq"],
        )
        assert repaired["street"] == hash_text(KEY.encode(), "99 Hidden Lane")
        again = await rec.run(data.TARGET, "checksum")
        assert (again["status"], again["mismatches"]) == ("succeeded", 0)
    finally:
        await setup_runs.aclose()


async def test_mask_apply_killed_mid_run_resumes_where_it_stopped(
    stack: Endpoints, unique: Unique, people: People
) -> None:
    """`mask apply` killed with SIGKILL partway: the batches it committed stay done, the next
    run resumes after them, counts every row exactly once and leaves every row masked."""
    schema = unique.schema("maskkill")
    base = sink_env(stack, topic=people.topic, group=unique("group"), schema=schema)
    await create_topic(stack.kafka, people.topic)
    await people.write({i: person(i) for i in range(80)})
    await run_worker(base)
    env = {
        **base,
        **{f"CDC_{k.upper()}": v for k, v in masking_env(people.rules("name=redact")).items()},
    }
    apply = ("mask", "apply", "--table", "cdc_people", "--batch-rows", "1")
    process = subprocess.Popen(
        [sys.executable, "-m", "cdc_sink", *apply],
        env={**os.environ, **env, "PYTHONPATH": str(REPO / "src")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        done = 0
        for _ in range(1200):
            progress = await sql(
                stack.postgres_dsn, schema, "SELECT rows_done FROM _cdc_mask_progress"
            )
            done = progress[0]["rows_done"] if progress else 0
            if done >= 5 or process.poll() is not None:
                break
            await asyncio.sleep(0.05)
    finally:
        kill(process)
    [stopped] = await sql(
        stack.postgres_dsn, schema, "SELECT rows_done, finished_at FROM _cdc_mask_progress"
    )
    assert stopped["finished_at"] is None
    assert 5 <= stopped["rows_done"] < 80

    resumed = mask_apply(env, "--batch-rows", "7")
    assert (resumed["resumed"], resumed["finished"], resumed["rows_done"]) == (True, True, 80)
    stored = await stored_people(stack.postgres_dsn, schema)
    assert {row["name"] for row in stored.values()} == {MARKER}
    assert len(stored) == 80


# --- hash of columns that are not text -----------------------------------------------------

LEDGER_CQL = (
    "CREATE TABLE {ks}.ledger (id int PRIMARY KEY, n int, u uuid, at timestamp, "
    "price decimal, big bigint, note text) WITH cdc = true"
)
LEDGER_COLUMNS: dict[str, Any] = {
    "id": "int32",
    "n": "int32",
    "u": {"type": "string", "name": "io.debezium.data.Uuid"},
    "at": {"type": "int64", "name": "io.debezium.time.Timestamp"},
    "price": "string",
    "big": "int64",
    "note": "string",
}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# Decimal texts as Debezium sends them, and the canonical text each one is hashed as.
PRICES = {"12.50": "12.5", "-0.000": "0", "1E+3": "1000", "0.001": "0.001", "7": "7"}


def ledger_row(i: int) -> dict[str, Any]:
    return {
        "n": -i * 1000 - 1,
        "u": str(uuid.UUID(int=i * 7919 + 1)).upper(),  # Debezium may send either case
        "at": 1_700_000_000_000 + i * 1001,
        "price": list(PRICES)[i % len(PRICES)],
        "big": 2**40 + i,
        "note": f"note {i}",
    }


def ledger_text(column: str, value: Any) -> str:
    """The canonical text of a Cassandra value, worked out by hand as an analyst would."""
    if column == "u":
        return str(value).lower()
    if column == "at":
        stamp = (
            value if isinstance(value, dt.datetime) else EPOCH + dt.timedelta(milliseconds=value)
        )
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
    if column == "price":
        return PRICES.get(str(value)) or format(Decimal(value).normalize(), "f")
    return str(value)


class Ledger:
    """The `ledger` table in a keyspace of its own, written to Cassandra and, as the agent
    would send them, to the topic."""

    def __init__(self, stack: Endpoints, unique: Unique) -> None:
        self.stack = stack
        self.keyspace = unique.keyspace("hashed")
        self.topic = unique("cdc-events-ledger")
        self.ts = TS0
        create_cassandra_table(stack, self.keyspace, LEDGER_CQL.format(ks=self.keyspace))
        self.session: Session = cassandra_session(stack)

    def rules(self, *rules: str) -> str:
        return "; ".join(f"{self.keyspace}.ledger.{rule}" for rule in rules)

    async def write(self, rows: dict[int, dict[str, Any]], op: str = "i") -> None:
        records = []
        for i, cells in rows.items():
            self.ts += 10
            native = {n: self._native(n, v) for n, v in cells.items()}
            if op == "d":
                self.session.execute(
                    f"DELETE FROM {self.keyspace}.ledger USING TIMESTAMP {self.ts} WHERE id = %s",
                    [i],
                )
            elif op == "i":
                names = ", ".join(native)
                self.session.execute(
                    f"INSERT INTO {self.keyspace}.ledger (id, {names}) VALUES "
                    f"(%s, {', '.join('%s' for _ in native)}) USING TIMESTAMP {self.ts}",
                    [i, *native.values()],
                )
            else:
                sets = ", ".join(f"{n} = %s" for n in native)
                self.session.execute(
                    f"UPDATE {self.keyspace}.ledger USING TIMESTAMP {self.ts} SET {sets} "
                    "WHERE id = %s",
                    [*native.values(), i],
                )
            records.append(
                json_with_schema(
                    self.keyspace, "ledger", LEDGER_COLUMNS, {"id": i}, cells, op=op, ts_us=self.ts
                )
            )
        await produce(self.stack.kafka, self.topic, records)

    @staticmethod
    def _native(column: str, value: Any) -> Any:
        if value is None:
            return None
        if column == "u":
            return uuid.UUID(value)
        if column == "at":
            return EPOCH + dt.timedelta(milliseconds=value)
        if column == "price":
            return Decimal(value)
        return value

    def cassandra_rows(self) -> dict[int, dict[str, Any]]:
        rows = self.session.execute(
            f"SELECT id, n, u, at, price, big, note FROM {self.keyspace}.ledger"
        )
        return {r.id: r._asdict() for r in rows}

    def masked(
        self, hashed: tuple[str, ...], key: bytes = KEY.encode()
    ) -> dict[int, dict[str, Any]]:
        """What PostgreSQL must hold: the hashed columns' digests of their canonical text."""
        return {
            i: {
                c: None if v is None else hash_text(key, ledger_text(c, v)) if c in hashed else v
                for c, v in row.items()
                if c != "id"
            }
            for i, row in self.cassandra_rows().items()
        }


@pytest.fixture
def ledger(stack: Endpoints, unique: Unique) -> Iterator[Ledger]:
    table = Ledger(stack, unique)
    try:
        yield table
    finally:
        table.session.cluster.shutdown()


async def stored_ledger(dsn: str, schema: str) -> dict[int, dict[str, Any]]:
    rows = await sql(dsn, schema, "SELECT id, n, u, at, price, big, note FROM cdc_ledger")
    return {r["id"]: {c: v for c, v in r.items() if c != "id"} for r in rows}


async def stored_big(dsn: str, schema: str) -> dict[int, Any]:
    return {i: row["big"] for i, row in (await stored_ledger(dsn, schema)).items()}


def big_of(rows: dict[int, dict[str, Any]]) -> dict[int, Any]:
    return {i: row["big"] for i, row in rows.items()}


async def ledger_types(dsn: str, schema: str) -> dict[str, str]:
    rows = await sql(
        dsn,
        schema,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = $1 AND table_name = 'cdc_ledger' AND column_name = ANY($2)",
        schema,
        list(LEDGER_COLUMNS),
    )
    return {r["column_name"]: r["data_type"] for r in rows}


async def test_hashed_columns_that_are_not_text_hold_digests_and_reconcile(
    stack: Endpoints, unique: Unique, ledger: Ledger
) -> None:
    """Hashed int, uuid, timestamp and decimal columns, streamed with inserts, partial updates
    and deletes: PostgreSQL makes them text and holds exactly the masked model (each digest
    that of the value's documented canonical text); checksum reconciliation finds zero
    differences, then exactly one once a hashed value is changed behind the sink, which
    repair fixes with the digest."""
    hashed = ("n", "u", "at", "price")
    rules = ledger.rules(*(f"{c}=hash" for c in hashed))
    schema = unique.schema("hashnontext")
    env = sink_env(
        stack, topic=ledger.topic, group=unique("group"), schema=schema, **masking_env(rules)
    )
    await create_topic(stack.kafka, ledger.topic)
    await ledger.write({i: ledger_row(i) for i in range(30)})
    await ledger.write({3: {"n": 5}, 4: {"price": "0.001", "at": 0}, 5: {"u": None}}, op="u")
    await ledger.write({6: {}, 7: {}}, op="d")
    await run_worker(env)

    assert await ledger_types(stack.postgres_dsn, schema) == {
        "id": "integer",
        "n": "text",
        "u": "text",
        "at": "text",
        "price": "text",
        "big": "bigint",
        "note": "text",
    }
    stored = await stored_ledger(stack.postgres_dsn, schema)
    assert stored == ledger.masked(hashed)
    assert 6 not in stored
    assert stored[3]["n"] == hash_text(KEY.encode(), "5")
    assert stored[4]["at"] == hash_text(KEY.encode(), "1970-01-01T00:00:00.000Z")
    assert stored[5]["u"] is None

    assert differences(env, "cdc_ledger") == 0
    ledger.session.execute(
        f"UPDATE {ledger.keyspace}.ledger USING TIMESTAMP {ledger.ts + 1000} "
        "SET price = 99.990 WHERE id = 11"
    )
    assert await one_difference_repaired(env, stack.postgres_dsn, schema, "cdc_ledger") == (
        [11],
        ["price"],
    )
    stored = await stored_ledger(stack.postgres_dsn, schema)
    assert stored[11]["price"] == hash_text(KEY.encode(), "99.99")
    assert differences(env, "cdc_ledger") == 0


async def test_a_hash_rule_on_an_existing_bigint_column_and_its_removal(
    stack: Endpoints, unique: Unique, ledger: Ledger, tmp_path: Path
) -> None:
    """A `hash` rule added to a table whose `big` column is bigint: the sink restarted with it
    changes the column to text while it streams, `mask apply` rewrites the clear values to
    digests, and reconciliation then finds nothing. With the rule removed again the column
    stays text: the sink writes the clear canonical text and `mask apply --column big`
    rewrites the digests to it, again with nothing for reconciliation to find."""
    schema = unique.schema("hashbigint")
    base = sink_env(stack, topic=ledger.topic, group=unique("group"), schema=schema)
    await create_topic(stack.kafka, ledger.topic)
    await ledger.write({i: ledger_row(i) for i in range(60)})
    await run_worker(base)
    assert (await ledger_types(stack.postgres_dsn, schema))["big"] == "bigint"

    env = {
        **base,
        **{f"CDC_{k.upper()}": v for k, v in masking_env(ledger.rules("big=hash")).items()},
    }
    log_path = tmp_path / "worker.log"
    worker = start_worker_process(env, log_path, stop_when_caught_up=False)
    try:
        await ledger.write({i: ledger_row(i) for i in range(60, 70)})
        await ledger.write({2: {"big": -5}, 65: {"big": 123}}, op="u")
        await wait_for_applied(stack.postgres_dsn, schema, 60 + 10 + 2 - 1, worker)
        assert worker.poll() is None, log_path.read_text()[-3000:]
        assert (await ledger_types(stack.postgres_dsn, schema))["big"] == "text"
        halfway = await stored_ledger(stack.postgres_dsn, schema)
        assert halfway[65]["big"] == hash_text(KEY.encode(), "123")  # written by the sink
        assert halfway[2]["big"] == hash_text(KEY.encode(), "-5")
        assert halfway[10]["big"] == str(2**40 + 10)  # written before the rule: cast to text
        outcome = mask_apply(env, "--batch-rows", "16", table="cdc_ledger")
        assert outcome["finished"]
        await ledger.write({70: ledger_row(70)})
        await wait_for_applied(stack.postgres_dsn, schema, 60 + 10 + 2 + 1 - 1, worker)
    finally:
        kill(worker)
    assert await stored_big(stack.postgres_dsn, schema) == big_of(ledger.masked(("big",)))
    assert differences(env, "cdc_ledger") == 0

    # The rule removed: the column stays text and gets the clear canonical text.
    await ledger.write({2: {"big": 777}}, op="u")
    await run_worker(base)
    assert (await ledger_types(stack.postgres_dsn, schema))["big"] == "text"
    assert (await stored_ledger(stack.postgres_dsn, schema))[2]["big"] == "777"
    outcome = mask_apply(base, "--column", "big", table="cdc_ledger")
    assert outcome["finished"]
    clear = {i: str(big) for i, big in big_of(ledger.masked(())).items()}
    assert await stored_big(stack.postgres_dsn, schema) == clear
    assert differences(base, "cdc_ledger") == 0


async def test_mask_apply_makes_a_newly_hashed_column_text_before_any_pod_does(
    stack: Endpoints, unique: Unique, ledger: Ledger
) -> None:
    """`mask apply` run for a new `hash` rule on an int and a timestamp column before any pod
    with the rule has seen the table: it changes both columns to text itself and writes the
    digests, and a pod started afterwards streams on into them."""
    schema = unique.schema("hashapplyfirst")
    base = sink_env(stack, topic=ledger.topic, group=unique("group"), schema=schema)
    await create_topic(stack.kafka, ledger.topic)
    await ledger.write({i: ledger_row(i) for i in range(20)})
    await run_worker(base)
    hashed = ("n", "at")
    rules = ledger.rules(*(f"{c}=hash" for c in hashed))
    env = {**base, **{f"CDC_{k.upper()}": v for k, v in masking_env(rules).items()}}
    outcome = mask_apply(env, table="cdc_ledger")
    assert (outcome["rows_written"], outcome["finished"]) == (20, True)
    types = await ledger_types(stack.postgres_dsn, schema)
    assert (types["n"], types["at"], types["big"]) == ("text", "text", "bigint")
    await ledger.write({20: ledger_row(20), 3: {"n": 42}})
    await ledger.write({4: {"at": 86_400_000}}, op="u")
    await run_worker(env)
    stored = await stored_ledger(stack.postgres_dsn, schema)
    expected = ledger.masked(hashed)
    assert {i: (r["n"], r["at"]) for i, r in stored.items()} == {
        i: (r["n"], r["at"]) for i, r in expected.items()
    }
    assert stored[4]["at"] == hash_text(KEY.encode(), "1970-01-02T00:00:00.000Z")
    assert differences(env, "cdc_ledger") == 0
