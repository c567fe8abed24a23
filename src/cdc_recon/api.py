"""HTTP routes of the reconciliation service, on the sink's HttpServer.

GET  /reconciliation/jobs                      ?table=&strategy=&status=&limit=
GET  /reconciliation/jobs/{id}
POST /reconciliation/jobs                      {"table", "strategy", "window_start"?,
                                                "window_end"?, "sample_size"?, "seed"?}
                                               → 202 {"id", ...}; the job runs in this process
GET  /reconciliation/mismatches                ?job=&table=&kind=&status=&limit=
POST /reconciliation/mismatches/{id}/resolve   {"resolution": "...", "status"?: "resolved"}

Errors answer JSON {"error": message}: 400 for a bad request or unknown strategy, 404 for an
unknown table, job or mismatch, 503 when Cassandra cannot be reached or no connection of the
API's pool comes free in time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdc_recon.errors import (
    InvalidRequestError,
    ReconError,
    UnknownJobError,
    UnknownStrategyError,
    UnknownTableError,
)
from cdc_recon.repository import Repository
from cdc_sink.ops.http import (
    BIGINT_MAX,
    HttpError,
    HttpServer,
    Request,
    Response,
    int_param,
    json_response,
)

if TYPE_CHECKING:
    from cdc_recon.runtime import ReconciliationRuntime

KINDS = ("missing_in_postgres", "extra_in_postgres", "value_mismatch")


MAX_LIMIT = 10_000


def _int(request: Request, name: str, high: int = BIGINT_MAX) -> int | None:
    raw = _text(request, name)
    return None if raw is None else int_param(raw, name, high=high)


def _text(request: Request, name: str) -> str | None:
    values = request.query.get(name)
    return values[0] if values else None


def _http_error(exc: ReconError) -> HttpError:
    if isinstance(exc, UnknownTableError | UnknownJobError):
        return HttpError(404, str(exc))
    if isinstance(exc, UnknownStrategyError | InvalidRequestError):
        return HttpError(400, str(exc))
    return HttpError(503, str(exc))


def add_reconciliation_routes(server: HttpServer, runtime: ReconciliationRuntime) -> None:
    """Register the /reconciliation routes, served by `runtime`."""
    repository = Repository(runtime.pool, runtime.config.postgres.schema)

    async def list_jobs(request: Request) -> Response:
        jobs = await repository.jobs(
            table=_text(request, "table"),
            strategy=_text(request, "strategy"),
            status=_text(request, "status"),
            limit=_int(request, "limit", MAX_LIMIT) or 100,
        )
        return json_response({"jobs": jobs})

    async def get_job(request: Request) -> Response:
        job_id = int_param(request.path_params["id"], "id")
        job = await repository.job(job_id)
        if job is None:
            raise HttpError(404, f"no reconciliation job {job_id}")
        return json_response(job)

    async def create_job(request: Request) -> Response:
        body: Any = request.json()
        if not isinstance(body, dict) or not isinstance(body.get("table"), str):
            raise HttpError(400, 'the body must be a JSON object with "table" and "strategy"')
        if not isinstance(body.get("strategy"), str):
            raise HttpError(400, 'the body must name a "strategy"')
        options = {k: v for k, v in body.items() if k not in ("table", "strategy")}
        try:
            reconciler = await runtime.reconciler()
            # Recorded with the API's connections: reconciliation's may all be busy with jobs.
            job_id = await reconciler.submit(
                body["table"], body["strategy"], options, pool=runtime.pool
            )
        except ReconError as exc:
            raise _http_error(exc) from exc
        runtime.spawn(reconciler.execute(job_id))
        return json_response(await repository.job(job_id), status=202)

    async def list_mismatches(request: Request) -> Response:
        kind = _text(request, "kind")
        if kind is not None and kind not in KINDS:
            raise HttpError(400, f"kind must be one of {', '.join(KINDS)}")
        found = await repository.mismatches(
            job=_int(request, "job"),
            table=_text(request, "table"),
            kind=kind,
            status=_text(request, "status"),
            limit=_int(request, "limit", MAX_LIMIT) or 1000,
        )
        return json_response({"mismatches": found})

    async def resolve(request: Request) -> Response:
        mismatch_id = int_param(request.path_params["id"], "id")
        body: Any = request.json()
        if not isinstance(body, dict) or not isinstance(body.get("resolution"), str):
            raise HttpError(400, 'the body must be a JSON object with a "resolution" text')
        status = body.get("status", "resolved")
        if status not in ("resolved", "open", "ignored"):
            raise HttpError(400, "status must be resolved, open or ignored")
        found = await repository.resolve(mismatch_id, body["resolution"], status)
        if found is None:
            raise HttpError(404, f"no reconciliation mismatch {mismatch_id}")
        return json_response(found)

    server.route("GET", "/reconciliation/jobs", list_jobs)
    server.route("GET", "/reconciliation/jobs/{id}", get_job)
    server.route("POST", "/reconciliation/jobs", create_job)
    server.route("GET", "/reconciliation/mismatches", list_mismatches)
    server.route("POST", "/reconciliation/mismatches/{id}/resolve", resolve)
