"""HTTP routes of the reconciliation service: an APIRouter the worker's control API mounts.

GET  /reconciliation/jobs                      ?table=&strategy=&status=&limit=   cdc:read
GET  /reconciliation/jobs/{id}                                                    cdc:read
POST /reconciliation/jobs                      {"table", "strategy", "window_start"?,
                                                "window_end"?, "sample_size"?, "seed"?}
                                               → 202 {"id", ...}; runs in this process cdc:write
GET  /reconciliation/mismatches                ?job=&table=&kind=&status=&limit=  cdc:payload
POST /reconciliation/mismatches/{id}/resolve   {"resolution": "...", "status"?}   cdc:write

Mismatches carry the differing values of a row, hence cdc:payload. Job creation and
resolutions are written to `_cdc_audit_log`. Errors answer JSON {"error": message}: 400 for a
bad request or unknown strategy, 404 for an unknown table, job or mismatch, 503 when Cassandra
cannot be reached or no connection of the API's pool comes free in time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, ConfigDict

from cdc_recon.errors import (
    InvalidRequestError,
    ReconError,
    UnknownJobError,
    UnknownStrategyError,
    UnknownTableError,
)
from cdc_recon.repository import Repository
from cdc_sink.ops.audit import audit
from cdc_sink.ops.auth import PAYLOAD, READ, WRITE, Authenticator, Principal, require
from cdc_sink.ops.http import ApiError, JsonRoute, json_response, whole

if TYPE_CHECKING:
    from cdc_recon.runtime import ReconciliationRuntime

MAX_LIMIT = 10_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobsQuery(_Strict):
    table: str | None = None
    strategy: str | None = None
    status: str | None = None
    limit: Annotated[int, whole("limit", high=MAX_LIMIT)] = 100


class MismatchesQuery(_Strict):
    job: Annotated[int, whole("job")] | None = None
    table: str | None = None
    kind: Literal["missing_in_postgres", "extra_in_postgres", "value_mismatch"] | None = None
    status: str | None = None
    limit: Annotated[int, whole("limit", high=MAX_LIMIT)] = 1000


class NewJob(_Strict):
    """What a job compares; the strategy's own options are checked when it is submitted."""

    table: str
    strategy: str
    window_start: str | int | float | None = None
    window_end: str | int | float | None = None
    sample_size: int | None = None
    seed: int | None = None


class Resolution(_Strict):
    resolution: str
    status: Literal["resolved", "open", "ignored"] = "resolved"


def _http_error(exc: ReconError) -> ApiError:
    if isinstance(exc, UnknownTableError | UnknownJobError):
        return ApiError(404, str(exc))
    if isinstance(exc, UnknownStrategyError | InvalidRequestError):
        return ApiError(400, str(exc))
    return ApiError(503, str(exc))


def reconciliation_routes(runtime: ReconciliationRuntime, auth: Authenticator) -> APIRouter:
    """The /reconciliation routes, served by `runtime`."""
    repository = Repository(runtime.pool, runtime.config.postgres.schema)
    router = APIRouter(prefix="/reconciliation", route_class=JsonRoute, tags=["reconciliation"])
    reader = Depends(require(auth, READ))
    payload_reader = Depends(require(auth, PAYLOAD))
    writer = Depends(require(auth, WRITE))

    @router.get("/jobs")
    async def list_jobs(query: Annotated[JobsQuery, Query()], _: Principal = reader) -> Response:
        jobs = await repository.jobs(
            table=query.table, strategy=query.strategy, status=query.status, limit=query.limit
        )
        return json_response({"jobs": jobs})

    @router.get("/jobs/{job_id}")
    async def get_job(
        job_id: Annotated[int, whole("id"), Path()], _: Principal = reader
    ) -> Response:
        job = await repository.job(job_id)
        if job is None:
            raise ApiError(404, f"no reconciliation job {job_id}")
        return json_response(job)

    @router.post("/jobs", status_code=202)
    async def create_job(body: NewJob, caller: Principal = writer) -> Response:
        options = body.model_dump(exclude={"table", "strategy"}, exclude_none=True)
        try:
            reconciler = await runtime.reconciler()
            # Recorded with the API's connections: reconciliation's may all be busy with jobs.
            job_id = await reconciler.submit(body.table, body.strategy, options, pool=runtime.pool)
        except ReconError as exc:
            raise _http_error(exc) from exc
        await audit(
            runtime.pool,
            caller.subject,
            "reconciliation_job",
            {"job": job_id, **body.model_dump(exclude_none=True)},
        )
        runtime.spawn(reconciler.execute(job_id))
        return json_response(await repository.job(job_id), status=202)

    @router.get("/mismatches")
    async def list_mismatches(
        query: Annotated[MismatchesQuery, Query()], _: Principal = payload_reader
    ) -> Response:
        found = await repository.mismatches(
            job=query.job,
            table=query.table,
            kind=query.kind,
            status=query.status,
            limit=query.limit,
        )
        return json_response({"mismatches": found})

    @router.post("/mismatches/{mismatch_id}/resolve")
    async def resolve(
        mismatch_id: Annotated[int, whole("id"), Path()],
        body: Resolution,
        caller: Principal = writer,
    ) -> Response:
        found = await repository.resolve(mismatch_id, body.resolution, body.status)
        if found is None:
            raise ApiError(404, f"no reconciliation mismatch {mismatch_id}")
        await audit(
            runtime.pool,
            caller.subject,
            "mismatch_resolution",
            {"mismatch": mismatch_id, **body.model_dump()},
        )
        return json_response(found)

    return router
