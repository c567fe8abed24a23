"""Unique names for what a test makes, and the clean-up of the schemas and keyspaces among them."""

from __future__ import annotations

from tests.support.pipeline import drop_schema, execute_cql
from tests.support.stack import Endpoints
from tests.support.topics import unique_name


class Unique:
    """unique("topic") -> "topic_3f2a9c1b7d40": this run's token and eight random hex digits.
    unique.schema(prefix) and unique.keyspace(prefix) name a PostgreSQL schema and a Cassandra
    keyspace the same way and remember them, for `drop` to remove when the test ends."""

    def __init__(self, stack: Endpoints) -> None:
        self.stack = stack
        self.schemas: list[str] = []
        self.keyspaces: list[str] = []

    def __call__(self, prefix: str) -> str:
        return unique_name(prefix)

    def schema(self, prefix: str) -> str:
        self.schemas.append(unique_name(prefix))
        return self.schemas[-1]

    def keyspace(self, prefix: str) -> str:
        self.keyspaces.append(unique_name(prefix))
        return self.keyspaces[-1]

    async def drop(self) -> None:
        """Drop every schema and keyspace named (those never made included)."""
        for schema in self.schemas:
            await drop_schema(self.stack.postgres_dsn, schema)
        if self.keyspaces:
            execute_cql(self.stack, *(f"DROP KEYSPACE IF EXISTS {k}" for k in self.keyspaces))
