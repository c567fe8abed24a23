"""Dead letters at rest: list, show and replay the records kept in `_cdc_dlq_records`.

Used by `python -m cdc_sink dlq …` and by the worker's HTTP API (GET /dlq, GET /dlq/{id},
POST /dlq/replay, POST /dlq/resume). Replaying re-produces a record — original key, value and
headers plus `cdc.replay.of` — to its original topic and partition (acks=all), then marks it
replayed; the worker applies it like any other record, or dead-letters it again (as a new
record) if the cause is not fixed. Each replay is written to `_cdc_audit_log`.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from cdc_sink.dlq.letters import Header, headers_from_json
from cdc_sink.dlq.producer import DlqProducer
from cdc_sink.errors import UNREAD_BATCH_STAGE, SinkError
from cdc_sink.ops.http import (
    BIGINT_MAX,
    HttpError,
    HttpServer,
    Request,
    Response,
    int_param,
    json_response,
)
from cdc_sink.ops.pools import BoundedPool

STATUSES = ("pending", "replayed")
LIST_COLUMNS = (
    "id, source_topic, source_partition, source_offset, error_class, stage, error_message, "
    "schema_id, failed_at, status, replayed_at"
)


@dataclass(frozen=True)
class DlqFilter:
    """Which dead letters a command means. Empty fields match everything."""

    ids: tuple[int, ...] = ()
    status: str | None = None
    topic: str | None = None
    error_class: str | None = None
    stage: str | None = None
    since: dt.datetime | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {self.status!r}")

    @property
    def is_empty(self) -> bool:
        return not (self.ids or self.topic or self.error_class or self.stage or self.since)

    def where(self) -> tuple[str, list[Any]]:
        """A SQL condition (parameters $1…) and its values."""
        clauses: list[str] = []
        values: list[Any] = []
        for column, value in (
            ("status", self.status),
            ("source_topic", self.topic),
            ("error_class", self.error_class),
            ("stage", self.stage),
        ):
            if value is not None:
                values.append(value)
                clauses.append(f"{column} = ${len(values)}")
        if self.ids:
            values.append(list(self.ids))
            clauses.append(f"id = ANY(${len(values)}::bigint[])")
        if self.since is not None:
            values.append(self.since)
            clauses.append(f"failed_at >= ${len(values)}")
        return (" AND ".join(clauses) or "true"), values

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> DlqFilter:
        """Build from JSON or query parameters; raise ValueError naming a bad field."""
        unknown = set(raw) - {"ids", "status", "topic", "error_class", "stage", "since"}
        if unknown:
            raise ValueError(f"unknown filter field(s): {', '.join(sorted(unknown))}")
        ids = raw.get("ids") or ()
        if isinstance(ids, str):
            ids = ids.split(",")
        since = raw.get("since")
        try:
            numbers = tuple(int(i) for i in ids)
            if any(not 1 <= i <= BIGINT_MAX for i in numbers):
                raise ValueError(f"ids must be between 1 and {BIGINT_MAX}")
            return cls(
                ids=numbers,
                status=raw.get("status"),
                topic=raw.get("topic"),
                error_class=raw.get("error_class"),
                stage=raw.get("stage"),
                since=_timestamp(since) if since else None,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid filter: {exc}") from None


def _timestamp(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


async def list_dead_letters(
    conn: asyncpg.Connection, where: DlqFilter, *, limit: int = 100, after_id: int = 0
) -> list[dict[str, Any]]:
    """Dead letters matching `where`, by id, at most `limit` after `after_id` (for paging)."""
    condition, values = where.where()
    rows = await conn.fetch(
        f"SELECT {LIST_COLUMNS} FROM _cdc_dlq_records WHERE {condition} "
        f"AND id > ${len(values) + 1} ORDER BY id LIMIT ${len(values) + 2}",
        *values,
        after_id,
        limit,
    )
    return [dict(row) for row in rows]


async def show_dead_letter(conn: asyncpg.Connection, dlq_id: int) -> dict[str, Any] | None:
    """One dead letter with its key, value (base64, and as text when it is UTF-8) and headers."""
    row = await conn.fetchrow("SELECT * FROM _cdc_dlq_records WHERE id = $1", dlq_id)
    if row is None:
        return None
    shown = dict(row)
    for field in ("record_key", "record_value"):
        raw = shown.pop(field)
        shown[f"{field}_base64"] = None if raw is None else base64.b64encode(raw).decode()
        try:
            shown[f"{field}_text"] = None if raw is None else raw.decode("utf-8")
        except UnicodeDecodeError:
            shown[f"{field}_text"] = None
    shown["headers"] = json.loads(row["headers"])
    return shown


async def replay_dead_letters(
    conn: asyncpg.Connection,
    producer: DlqProducer,
    where: DlqFilter,
    *,
    actor: str,
    limit: int = 10_000,
) -> list[int]:
    """Re-produce the matching dead letters (pending ones unless `where.status` says otherwise)
    to their original topic and partition, mark them replayed, audit; return their ids.

    Rows are locked while they are replayed, so two concurrent replays never send one record
    twice. A letter standing for a whole record batch (stage `fetch`) holds no record: it is
    passed over. Raises TransientError/FatalError if Kafka refuses (nothing is marked then)."""
    if where.status is None:
        where = dataclasses.replace(where, status="pending")
    condition, values = where.where()
    async with conn.transaction():
        rows = await conn.fetch(
            "SELECT id, source_topic, source_partition, record_key, record_value, headers "
            f"FROM _cdc_dlq_records WHERE {condition} AND stage <> '{UNREAD_BATCH_STAGE}' "
            "ORDER BY id "
            f"LIMIT ${len(values) + 1} FOR UPDATE SKIP LOCKED",
            *values,
            limit,
        )
        if not rows:
            return []
        await producer.send_replays(
            [
                (
                    row["source_topic"],
                    row["source_partition"],
                    row["record_key"],
                    row["record_value"],
                    _replay_headers(row["headers"], row["id"]),
                )
                for row in rows
            ]
        )
        ids = [row["id"] for row in rows]
        await conn.execute(
            "UPDATE _cdc_dlq_records SET status = 'replayed', replayed_at = now() "
            "WHERE id = ANY($1::bigint[])",
            ids,
        )
        await conn.execute(
            "INSERT INTO _cdc_audit_log (actor, action, details) VALUES ($1, 'dlq_replay', $2)",
            actor,
            json.dumps({"ids": ids}),
        )
    return ids


def _replay_headers(stored: Any, dlq_id: int) -> list[Header]:
    """The record's own headers (without an earlier replay's marker) and `cdc.replay.of`."""
    own = [(k, v) for k, v in headers_from_json(stored) if k != "cdc.replay.of"]
    return [*own, ("cdc.replay.of", str(dlq_id).encode())]


def add_dlq_routes(
    server: HttpServer,
    pool: BoundedPool,
    producer: Callable[[], DlqProducer | None],
    resume: Callable[[str | None, int | None], Awaitable[Sequence[Any]]],
) -> None:
    """GET /dlq (filters as query parameters, `limit`, `after_id`), GET /dlq/{id},
    POST /dlq/replay ({"ids": [...]} or {"filter": {...}} or {"all": true}),
    POST /dlq/resume ({"topic": …, "partition": …}, both optional)."""

    async def listing(request: Request) -> Response:
        query = {k: v[-1] for k, v in request.query.items()}
        limit = int_param(query.pop("limit", 100), "limit", high=1000)
        after_id = int_param(query.pop("after_id", 0), "after_id", low=0)
        try:
            where = DlqFilter.from_mapping(query)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        async with pool.acquire() as conn:
            records = await list_dead_letters(conn, where, limit=limit, after_id=after_id)
        return json_response({"records": records})

    async def show(request: Request) -> Response:
        dlq_id = int_param(request.path_params["id"], "id")
        async with pool.acquire() as conn:
            shown = await show_dead_letter(conn, dlq_id)
        if shown is None:
            raise HttpError(404, f"no dead letter {dlq_id}")
        return json_response(shown)

    async def replay(request: Request) -> Response:
        body = request.json() if request.body else {}
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        try:
            if "ids" in body:
                where = DlqFilter.from_mapping({"ids": body["ids"]})
            else:
                where = DlqFilter.from_mapping(body.get("filter") or {})
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        if where.is_empty and body.get("all") is not True:
            raise HttpError(400, 'say which records: "ids", "filter", or "all": true')
        kafka = producer()
        if kafka is None:
            raise HttpError(503, "the worker is not connected to Kafka yet")
        try:
            async with pool.acquire() as conn:
                replayed = await replay_dead_letters(conn, kafka, where, actor="http")
        except SinkError as exc:
            raise HttpError(503, f"replay failed, nothing marked: {exc}") from None
        return json_response({"replayed": replayed})

    async def resume_partitions(request: Request) -> Response:
        body = request.json() if request.body else {}
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        partition = body.get("partition")
        if partition is not None and not isinstance(partition, int):
            raise HttpError(400, "partition must be an integer")
        resumed = await resume(body.get("topic"), partition)
        return json_response({"resumed": [f"{tp.topic}[{tp.partition}]" for tp in resumed]})

    server.route("GET", "/dlq", listing)
    server.route("GET", "/dlq/{id}", show)
    server.route("POST", "/dlq/replay", replay)
    server.route("POST", "/dlq/resume", resume_partitions)
