"""PostgreSQL connection pools, one per role (the writer's, the worker's, the HTTP API's,
reconciliation's), so that no role can starve another. Every pool logs in through the
PostgresLogin, which reconnects it when a new user is leased.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from cdc_sink.apply.writer import prepare_connection
from cdc_sink.config import PostgresConfig
from cdc_sink.errors import TransientError
from cdc_sink.ops.secrets import PostgresLogin

__all__ = ["BoundedPool", "open_pool"]

SERVER_SETTINGS = {
    # Batch statements take key arrays of very different sizes into tables that grow fast: a
    # cached generic plan, made when a table was small, goes on scanning it whole; plan each
    # one (with the array's real size).
    "plan_cache_mode": "force_custom_plan",
    # Lookups by key probe an index per key; with the default (4, for spinning disks) the
    # planner prefers scanning the whole table long before that pays.
    "random_page_cost": "1.1",
}


async def open_pool(
    postgres: PostgresConfig,
    login: PostgresLogin,
    *,
    size: int,
    application_name: str,
) -> asyncpg.Pool:
    """A pool of at most `size` connections, named `application_name` in pg_stat_activity,
    following the login's users. Raises what asyncpg raises when PostgreSQL cannot be reached
    or refuses."""
    pool = await asyncpg.create_pool(
        connect=login.connect,
        min_size=1,
        max_size=size,
        timeout=postgres.connect_timeout_s,
        server_settings={
            "search_path": postgres.schema,
            "application_name": application_name,
            **SERVER_SETTINGS,
        },
        init=prepare_connection,
    )
    assert pool is not None
    return login.watch(pool)


class BoundedPool:
    """A pool whose callers wait at most `wait_s` for a connection; past that they get a
    TransientError saying so (the HTTP API answers it 503) instead of waiting in line for as
    long as the connections are busy. Offers what the API's handlers use of asyncpg.Pool."""

    def __init__(self, pool: asyncpg.Pool, wait_s: float, role: str) -> None:
        self.pool = pool
        self.wait_s = wait_s
        self.role = role

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            conn = await self.pool.acquire(timeout=self.wait_s)
        except TimeoutError:
            raise TransientError(
                f"no PostgreSQL connection of the {self.role} came free within {self.wait_s} s "
                f"(all {self.pool.get_max_size()} busy); try again"
            ) from None
        try:
            yield conn
        finally:
            await self.pool.release(conn)

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        async with self.acquire() as conn:
            rows: list[Any] = await conn.fetch(query, *args)
            return rows

    async def fetchrow(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.acquire() as conn:
            status: str = await conn.execute(query, *args)
            return status

    async def close(self) -> None:
        await self.pool.close()
