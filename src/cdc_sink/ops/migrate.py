"""Migrations: the versioned SQL files in sql/ applied once each, in order, idempotently.

The package reads them as its resource `migrations`: a link to sql/ in the source tree, copies in
the wheel, so every kind of install migrates.
"""

from __future__ import annotations

import os
import re
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import asyncpg

from cdc_sink.errors import FatalError
from cdc_sink.schema.tables import quote_ident

MIGRATION_LOCK = 0x63646373696E6B  # "cdcsink": one migrator at a time across workers
MIGRATION_FILE = re.compile(r"[0-9]{3}_.*\.sql")


def migrations(folder: Traversable | None = None) -> list[tuple[str, str]]:
    """(version, sql) for every `NNN_name.sql` in `folder`, else CDC_SQL_DIR (to apply another
    set), else the package's own, in version order."""
    override = os.environ.get("CDC_SQL_DIR")
    found = folder or (Path(override) if override else files("cdc_sink") / "migrations")
    names = sorted(item.name for item in found.iterdir() if MIGRATION_FILE.fullmatch(item.name))
    if not names:
        raise FileNotFoundError(f"no migrations found in {found}")
    return [(name.removesuffix(".sql"), found.joinpath(name).read_text("utf-8")) for name in names]


async def pending(conn: asyncpg.Connection, schema: str) -> list[str]:
    """Versions not yet applied in `schema`."""
    exists = await conn.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"{quote_ident(schema)}._cdc_migrations"
    )
    applied: set[str] = set()
    if exists:
        rows = await conn.fetch(f"SELECT version FROM {quote_ident(schema)}._cdc_migrations")
        applied = {row["version"] for row in rows}
    return [version for version, _ in migrations() if version not in applied]


async def migrate(conn: asyncpg.Connection, schema: str) -> list[str]:
    """Apply every pending migration in `schema`; return the versions applied now.
    FatalError (naming the schema and PostgreSQL's reason) if PostgreSQL refuses."""
    try:
        return await _migrate(conn, schema)
    except asyncpg.PostgresError as exc:
        hint = ""
        if exc.sqlstate == "42501":
            hint = (
                "; the role needs USAGE and CREATE on the schema (and CREATE on the database "
                "if the schema does not exist yet)"
            )
        raise FatalError(
            f"cannot apply the migrations in schema {schema!r} "
            f"({exc.sqlstate} {type(exc).__name__}: {exc}){hint}",
            stage="migrate",
        ) from exc


async def _migrate(conn: asyncpg.Connection, schema: str) -> list[str]:
    quoted = quote_ident(schema)
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        # Up to date: no DDL at all, so a role without CREATE (migrations applied by a DBA's
        # role) starts too. PostgreSQL checks CREATE even for IF NOT EXISTS on what exists.
        todo = set(await pending(conn, schema))
        if not todo:
            return []
        if not await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f"CREATE SCHEMA {quoted}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {quoted}._cdc_migrations "
            "(version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(f"SET LOCAL search_path TO {quoted}")
        for version, sql in migrations():
            if version in todo:
                await conn.execute(sql)
                await conn.execute("INSERT INTO _cdc_migrations (version) VALUES ($1)", version)
                applied_now.append(version)
    return applied_now
