"""Dead letters at rest: list, show and replay the records kept in `_cdc_dlq_records`.

Used by `python -m cdc_sink dlq …` and by the worker's HTTP API (`dlq_routes`). Replaying
re-produces a record — original key, value and headers plus `cdc.replay.of` — to its original
topic and partition (acks=all), then marks it replayed; the worker applies it like any other
record, or dead-letters it again (as a new record) if the cause is not fixed, or skips it
(counted) if its key was erased meanwhile. Each replay is written to `_cdc_audit_log`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, ConfigDict, field_validator

from cdc_sink.dlq.letters import Header, headers_from_json
from cdc_sink.dlq.producer import DlqProducer
from cdc_sink.errors import UNREAD_BATCH_STAGE, SinkError
from cdc_sink.ops.audit import audit
from cdc_sink.ops.auth import PAYLOAD, READ, WRITE, Authenticator, Principal, require
from cdc_sink.ops.http import BIGINT_MAX, ApiError, JsonRoute, json_response, whole
from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.pools import BoundedPool

log = get_logger("cdc_sink.dlq")

# Resumes the paused partitions of a topic (all if None), or one partition; returns them.
Resume = Callable[[str | None, int | None], Awaitable[Sequence[Any]]]

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
        if self.since is not None and self.since.tzinfo is None:  # a time without a zone is UTC
            object.__setattr__(self, "since", self.since.replace(tzinfo=dt.UTC))

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
        unknown = set(raw) - FILTER_FIELDS
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
                since=dt.datetime.fromisoformat(since) if since else None,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid filter: {exc}") from None


FILTER_FIELDS = {field.name for field in dataclasses.fields(DlqFilter)}


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
        await audit(conn, actor, "dlq_replay", {"ids": ids})
    return ids


def _replay_headers(stored: Any, dlq_id: int) -> list[Header]:
    """The record's own headers (without an earlier replay's marker) and `cdc.replay.of`."""
    own = [(k, v) for k, v in headers_from_json(stored) if k != "cdc.replay.of"]
    return [*own, ("cdc.replay.of", str(dlq_id).encode())]


class FilterBody(BaseModel):
    """Which dead letters a replay means (all fields optional; combined with AND)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[int, whole("ids")]] = []
    status: Literal["pending", "replayed"] | None = None
    topic: str | None = None
    error_class: str | None = None
    stage: str | None = None
    since: dt.datetime | None = None

    def dlq_filter(self) -> DlqFilter:
        return DlqFilter(**{**self.model_dump(include=FILTER_FIELDS), "ids": tuple(self.ids)})


class ListQuery(FilterBody):
    """GET /dlq: the filter as query parameters (`ids` comma-separated), and paging."""

    limit: Annotated[int, whole("limit", high=1000)] = 100
    after_id: Annotated[int, whole("after_id", low=0)] = 0

    @field_validator("ids", mode="before")
    @classmethod
    def _comma_separated(cls, raw: Any) -> Any:
        if isinstance(raw, list):
            return [part for item in raw for part in str(item).split(",") if part]
        return raw


class ReplayBody(BaseModel):
    """POST /dlq/replay: {"ids": [...]}, {"filter": {...}} or {"all": true}."""

    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[int, whole("ids")]] | None = None
    filter: FilterBody | None = None
    all: bool = False


class ResumeBody(BaseModel):
    """POST /dlq/resume: a topic and a partition, both optional."""

    model_config = ConfigDict(extra="forbid")
    topic: str | None = None
    partition: Annotated[int, whole("partition", low=0, high=2**31 - 1)] | None = None


def dlq_routes(
    pool: BoundedPool,
    producer: DlqProducer,
    resume: Resume,
    resume_requests: ResumeRequests,
    auth: Authenticator,
) -> APIRouter:
    """GET /dlq (filters as query parameters, `limit`, `after_id`; cdc:read), GET /dlq/{id}
    (with the payload; cdc:payload), POST /dlq/replay and POST /dlq/resume (cdc:write; both
    audited). A resume acts on this pod at once and is kept for the other pods to act on."""
    router = APIRouter(route_class=JsonRoute, tags=["dead letters"])
    reader = Depends(require(auth, READ))
    payload_reader = Depends(require(auth, PAYLOAD))
    writer = Depends(require(auth, WRITE))

    @router.get("/dlq")
    async def listing(query: Annotated[ListQuery, Query()], _: Principal = reader) -> Response:
        async with pool.acquire() as conn:
            records = await list_dead_letters(
                conn, query.dlq_filter(), limit=query.limit, after_id=query.after_id
            )
        return json_response({"records": records})

    @router.get("/dlq/{dlq_id}")
    async def show(
        dlq_id: Annotated[int, whole("id"), Path()], _: Principal = payload_reader
    ) -> Response:
        async with pool.acquire() as conn:
            shown = await show_dead_letter(conn, dlq_id)
        if shown is None:
            raise ApiError(404, f"no dead letter {dlq_id}")
        return json_response(shown)

    @router.post("/dlq/replay")
    async def replay(caller: Principal = writer, body: ReplayBody | None = None) -> Response:
        body = body or ReplayBody()
        if body.ids is not None:
            where = DlqFilter(ids=tuple(body.ids))
        else:
            where = (body.filter or FilterBody()).dlq_filter()
        if where.is_empty and not body.all:
            raise ApiError(400, 'say which records: "ids", "filter", or "all": true')
        try:
            async with pool.acquire() as conn:
                replayed = await replay_dead_letters(conn, producer, where, actor=caller.subject)
        except SinkError as exc:
            raise ApiError(503, f"replay failed, nothing marked: {exc}") from None
        return json_response({"replayed": replayed})

    @router.post("/dlq/resume")
    async def resume_partitions(
        caller: Principal = writer, body: ResumeBody | None = None
    ) -> Response:
        body = body or ResumeBody()
        async with pool.acquire() as conn, conn.transaction():
            await resume_requests.record(conn, body.topic, body.partition)
            await audit(conn, caller.subject, "dlq_resume", body.model_dump())
        resumed = await resume(body.topic, body.partition)
        return json_response({"resumed": [f"{tp.topic}[{tp.partition}]" for tp in resumed]})

    return router


class ResumeRequests:
    """Resume requests kept in `_cdc_resume_requests`, so that every pod resumes the paused
    partitions it holds, whichever pod the request reached."""

    def __init__(self) -> None:
        self._own: set[int] = set()  # acted on when they were made

    async def record(
        self, conn: asyncpg.Connection, topic: str | None, partition: int | None
    ) -> None:
        request_id = await conn.fetchval(
            "INSERT INTO _cdc_resume_requests (topic, partition) VALUES ($1, $2) RETURNING id",
            topic,
            partition,
        )
        self._own.add(int(request_id))

    async def follow(self, pool: asyncpg.Pool, resume: Resume, interval_s: float) -> None:
        """Every `interval_s`, act on the requests other pods recorded since the last look
        (those made before this pod's first look are not its concern). Runs until cancelled;
        a failed look is logged and tried again next time."""
        last: int | None = None
        while True:
            try:
                if last is None:
                    last = int(
                        await pool.fetchval("SELECT coalesce(max(id), 0) FROM _cdc_resume_requests")
                    )
                else:
                    last = await self._act(pool, resume, last)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("resume_requests_unread", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval_s)

    async def _act(self, pool: asyncpg.Pool, resume: Resume, last: int) -> int:
        rows = await pool.fetch(
            "SELECT id, topic, partition FROM _cdc_resume_requests WHERE id > $1 ORDER BY id",
            last,
        )
        for row in rows:
            last = row["id"]
            if row["id"] in self._own:
                self._own.discard(row["id"])
                continue
            await resume(row["topic"], row["partition"])
        return last
