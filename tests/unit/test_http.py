"""The HTTP listeners (FastAPI on uvicorn), driven over a real loopback socket by a raw client."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import structlog
from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict
from structlog.testing import capture_logs

from cdc_sink.config import ApiConfig
from cdc_sink.errors import FatalError, TransientError
from cdc_sink.ops.http import ApiError, JsonRoute, Listener, new_app, probe_routes, whole
from cdc_sink.ops.metrics import Metrics

HOST = "127.0.0.1"
MAX_BODY = 1024 * 1024


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _parse(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    if "content-length" in headers:
        assert int(headers["content-length"]) == len(body)
    return Reply(int(status_line.split(" ")[1]), headers, body)


async def send_raw(port: int, raw: bytes) -> Reply:
    """Write `raw`, read until the server closes the connection, parse the response."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    return _parse(data)


async def call(port: int, method: str, target: str, body: bytes = b"", **headers: str) -> Reply:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return await send_raw(port, head.encode() + body)


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid")
    table: str
    strategy: str


class JobsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    table: list[str] = []
    limit: Annotated[int, whole("limit", high=10)] = 5


@dataclass
class Served:
    listener: Listener
    metrics: Metrics
    readiness: dict[str, Any]

    @property
    def port(self) -> int:
        return self.listener.port


def app_for(metrics: Metrics, readiness: dict[str, Any]) -> Any:
    async def ready() -> tuple[bool, dict[str, Any]]:
        return readiness["ok"], readiness["detail"]

    router = APIRouter(route_class=JsonRoute)

    @router.get("/reconciliation/jobs/{job_id}")
    async def job(
        job_id: Annotated[int, whole("id"), Path()], query: Annotated[JobsQuery, Query()]
    ) -> dict[str, Any]:
        return {"id": job_id, "query": query.model_dump()}

    @router.post("/reconciliation/jobs", status_code=201)
    async def create(body: Job) -> dict[str, Any]:
        return {"received": body.model_dump()}

    @router.post("/echo")
    async def echo(body: dict[str, Any] | str | None = None) -> dict[str, Any]:
        return {"received": body}

    @router.get("/explode")
    async def explode() -> None:
        raise RuntimeError("postgresql://cdc_sink:s3cret@db/cdc unreachable")

    @router.get("/busy")
    async def busy() -> None:
        raise TransientError("no PostgreSQL connection came free in time")

    @router.delete("/reconciliation/jobs/{job_id}")
    async def missing(job_id: str) -> None:
        raise ApiError(404, f"no job {job_id}")

    app = new_app("test", ApiConfig(max_body_bytes=MAX_BODY, request_timeout_s=0.5))
    app.include_router(probe_routes(metrics, ready))
    app.include_router(router)
    return app


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    metrics = Metrics()
    readiness: dict[str, Any] = {"ok": True, "detail": {"partitions": 8, "postgres": "ok"}}
    listener = Listener(
        app_for(metrics, readiness), name="test", limits=ApiConfig(request_timeout_s=0.5)
    )
    await listener.start(HOST, 0, "CDC_TEST__PORT")
    try:
        yield Served(listener, metrics, readiness)
    finally:
        await listener.stop()


async def test_health_is_ok(served: Served) -> None:
    """GET /health answers 200 {"status": "ok"} as JSON, with a request id."""
    reply = await call(served.port, "GET", "/health")
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    assert reply.headers["content-type"] == "application/json"
    assert len(reply.headers["x-request-id"]) == 32


async def test_ready_reports_200_with_the_callback_detail(served: Served) -> None:
    """GET /ready answers 200 with the readiness callback's dict when it says ready."""
    reply = await call(served.port, "GET", "/ready")
    assert (reply.status, reply.json()) == (200, {"partitions": 8, "postgres": "ok"})


async def test_ready_reports_503_when_not_ready(served: Served) -> None:
    """GET /ready answers 503 with the callback's dict when it says not ready."""
    served.readiness.update(ok=False, detail={"partitions": 0, "postgres": "unreachable"})
    reply = await call(served.port, "GET", "/ready")
    assert (reply.status, reply.json()) == (503, {"partitions": 0, "postgres": "unreachable"})


async def test_metrics_serves_prometheus_text(served: Served) -> None:
    """GET /metrics answers the Prometheus content type and the recorded metric values."""
    served.metrics.assigned_partitions.set(8)
    reply = await call(served.port, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == served.metrics.render()[1]
    assert b"cdc_assigned_partitions 8.0" in reply.body


async def test_openapi_and_docs_are_served(served: Served) -> None:
    """/openapi.json describes the routes and /docs serves the interactive page."""
    spec = (await call(served.port, "GET", "/openapi.json")).json()
    assert "/reconciliation/jobs/{job_id}" in spec["paths"]
    assert (await call(served.port, "GET", "/docs")).status == 200


async def test_path_params_and_query_are_validated(served: Served) -> None:
    """A path id and query parameters (repeats kept) reach the route parsed by its models."""
    reply = await call(served.port, "GET", "/reconciliation/jobs/42?table=users&table=t2&limit=3")
    assert (reply.status, reply.json()) == (
        200,
        {"id": 42, "query": {"table": ["users", "t2"], "limit": 3}},
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/reconciliation/jobs/abc", "id must be a whole number, not 'abc'"),
        ("/reconciliation/jobs/1.5", "id must be a whole number, not '1.5'"),
        (f"/reconciliation/jobs/{2**63}", "id must be between 1 and 9223372036854775807"),
        ("/reconciliation/jobs/0", "id must be between 1 and 9223372036854775807"),
        ("/reconciliation/jobs/1?limit=11", "limit must be between 1 and 10"),
        ("/reconciliation/jobs/1?colour=red", "colour: Extra inputs are not permitted"),
    ],
)
async def test_a_bad_path_or_query_value_is_a_400_naming_it(
    served: Served, target: str, message: str
) -> None:
    """Numbers out of range or not whole, and unknown query parameters, answer 400 with a
    message naming the parameter (PostgreSQL would refuse such ids: a 500 before)."""
    reply = await call(served.port, "GET", target)
    assert (reply.status, reply.json()) == (400, {"error": message})


async def test_json_body_is_validated_whatever_its_content_type(served: Served) -> None:
    """A POSTed JSON body reaches the route through its model, with no Content-Type or a
    form one (as clients of the earlier server send); a missing or unknown field is a 400."""
    body = json.dumps({"table": "users", "strategy": "checksum"}).encode()
    for content_type in ({}, {"Content_Type": "application/x-www-form-urlencoded"}):
        reply = await call(served.port, "POST", "/reconciliation/jobs", body, **content_type)
        assert (reply.status, reply.json()) == (201, {"received": json.loads(body)})
    reply = await call(served.port, "POST", "/reconciliation/jobs", b'{"table": "t", "x": 1}')
    assert reply.status == 400
    assert "strategy" in reply.json()["error"]
    assert "x: Extra inputs are not permitted" in reply.json()["error"]


async def test_invalid_json_body_is_a_400(served: Served) -> None:
    """A body that is not JSON answers 400 with a JSON error saying so."""
    reply = await call(served.port, "POST", "/reconciliation/jobs", b"{not json")
    assert reply.status == 400
    assert "invalid JSON" in reply.json()["error"]


@pytest.mark.parametrize("levels", [101, 200_000])
async def test_a_json_body_nested_too_deeply_is_a_400(served: Served, levels: int) -> None:
    """A JSON body nesting deeper than MAX_NESTING levels is a 400 naming the limit, however
    deep (200,000 levels would exhaust the parser's stack), not a 500."""
    body = b"[" * levels + b"]" * levels
    reply = await call(served.port, "POST", "/echo", body)
    assert (reply.status, reply.json()) == (
        400,
        {"error": "JSON body nests deeper than 100 levels"},
    )


async def test_api_error_from_a_route_sets_the_status(served: Served) -> None:
    """A route raising ApiError(404, …) answers 404 with its message."""
    reply = await call(served.port, "DELETE", "/reconciliation/jobs/7")
    assert (reply.status, reply.json()) == (404, {"error": "no job 7"})


async def test_a_transient_failure_is_503_with_retry_after(served: Served) -> None:
    """A TransientError (no connection free in time) answers 503 with Retry-After: 1."""
    reply = await call(served.port, "GET", "/busy")
    assert (reply.status, reply.headers["retry-after"]) == (503, "1")
    assert reply.json() == {"error": "no PostgreSQL connection came free in time"}


async def test_unknown_path_is_404(served: Served) -> None:
    """A path no route matches answers 404 naming it."""
    reply = await call(served.port, "GET", "/nowhere")
    assert (reply.status, reply.json()) == (404, {"error": "no route for /nowhere"})
    assert (await call(served.port, "GET", "/reconciliation/jobs/7/extra")).status == 404


async def test_known_path_with_another_method_is_405(served: Served) -> None:
    """A known path with an unregistered method answers 405 listing the allowed methods."""
    reply = await call(served.port, "PUT", "/reconciliation/jobs/7")
    assert (reply.status, reply.json()) == (405, {"error": "method PUT not allowed"})
    assert "GET" in reply.headers["allow"]


async def test_body_over_the_limit_is_413_without_reading_it(served: Served) -> None:
    """A Content-Length above the limit answers 413 before any body byte is sent."""
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1048577\r\n\r\n"
    reply = await send_raw(served.port, head)
    assert (reply.status, reply.json()) == (413, {"error": "body larger than 1048576 bytes"})


async def test_a_chunked_body_over_the_limit_is_413(served: Served) -> None:
    """A chunked body is counted as it arrives and refused with 413 once past the limit."""
    chunk = b"x" * 65_536
    raw = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw += (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 17 + b"0\r\n\r\n"
    reply = await send_raw(served.port, raw)
    assert (reply.status, reply.json()) == (413, {"error": "body larger than 1048576 bytes"})


async def test_body_at_the_limit_is_accepted(served: Served) -> None:
    """A body of exactly the limit is read and handed to the route."""
    body = json.dumps("x" * (MAX_BODY - 2)).encode()
    assert len(body) == MAX_BODY
    reply = await call(served.port, "POST", "/echo", body)
    assert reply.status == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nno-colon-here\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: " + b"9" * 4300 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
)
async def test_malformed_request_is_400(served: Served, raw: bytes) -> None:
    """A malformed request line or header, a negative or 4,300-digit Content-Length, and
    two Content-Lengths that disagree answer 400 (h11 parses the request)."""
    reply = await send_raw(served.port, raw)
    assert reply.status == 400


async def test_a_head_over_the_limit_is_refused() -> None:
    """Headers larger than max_header_bytes are refused with 431, whether the head arrives
    at once or in pieces (then h11 stops reading it past the limit and answers 400)."""
    limits = ApiConfig(max_body_bytes=MAX_BODY, max_header_bytes=4096)
    app = new_app("test", limits)
    listener = Listener(app, name="test", limits=limits)
    await listener.start(HOST, 0, "CDC_TEST__PORT")
    try:
        raw = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n"
        reply = await send_raw(listener.port, raw)
        assert (reply.status, reply.json()) == (431, {"error": "headers larger than 4096 bytes"})
        reader, writer = await asyncio.open_connection(HOST, listener.port)
        try:
            writer.write(raw[:100])
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(raw[100:-4])  # the head never ends, and passes the limit
            data = await asyncio.wait_for(reader.read(), timeout=5)
        finally:
            writer.close()
            await writer.wait_closed()
        assert _parse(data).status in (400, 431)
    finally:
        await listener.stop()


async def test_handler_exception_is_500_json_and_logged(served: Served) -> None:
    """A route that raises answers 500 with a JSON error that leaks nothing, and is logged."""
    with capture_logs() as logs:
        reply = await call(served.port, "GET", "/explode")
    assert (reply.status, reply.json()) == (500, {"error": "internal server error"})
    assert b"s3cret" not in reply.body
    failed = [entry for entry in logs if entry["event"] == "http_handler_failed"]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "error"
    assert failed[0]["path"] == "/explode"


async def test_the_request_id_is_kept_from_the_client_and_bound_to_log_lines(
    served: Served,
) -> None:
    """A plain X-Request-ID from the client is sent back and carried by the request's log
    lines; one that is not a plain token is replaced."""
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        reply = await call(served.port, "GET", "/explode", X_Request_ID="abc-123")
    assert reply.headers["x-request-id"] == "abc-123"
    [failed] = [entry for entry in logs if entry["event"] == "http_handler_failed"]
    assert failed["request_id"] == "abc-123"
    odd = await call(served.port, "GET", "/health", X_Request_ID="a b")
    assert odd.headers["x-request-id"] != "a b"


async def test_keep_alive_serves_several_requests_on_one_connection(served: Served) -> None:
    """Two requests on one connection are both answered (the earlier server closed after
    each one)."""
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        for _ in range(2):
            writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            assert await reader.readexactly(length) == b'{"status":"ok"}'
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    "partial",
    [b"GET /health HTTP/1.1\r\nHost: x\r\n", b"G", b"POST /echo HTTP/1.1\r\nContent-Length: 9"],
)
async def test_a_client_that_never_finishes_its_head_is_disconnected(
    served: Served, partial: bytes
) -> None:
    """A client that starts a request head and stops (slowloris) is disconnected after the
    request timeout rather than holding the connection."""
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        writer.write(partial)
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_client_that_never_finishes_its_body_gets_408(served: Served) -> None:
    """A request whose body does not arrive within the request timeout is answered 408."""
    reader, writer = await asyncio.open_connection(HOST, served.port)
    try:
        writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n{")
        data = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()
    reply = _parse(data)
    assert (reply.status, reply.json()) == (408, {"error": "request not received in time"})


async def test_a_client_that_does_not_read_its_answer_is_let_go() -> None:
    """A client that asks for a large answer, sent in parts, and never reads it is let go
    once a part has waited the request timeout to be taken, and the log says so."""
    router = APIRouter()

    async def parts() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * 1024 * 1024

    @router.get("/large")
    async def large() -> StreamingResponse:
        return StreamingResponse(parts())

    app = new_app("test", ApiConfig(max_body_bytes=MAX_BODY))
    app.include_router(router)
    listener = Listener(app, name="test", limits=ApiConfig(request_timeout_s=0.5))
    await listener.start(HOST, 0, "CDC_TEST__PORT")
    try:
        with capture_logs() as logs:
            reader, writer = await asyncio.open_connection(HOST, listener.port)
            writer.write(b"GET /large HTTP/1.1\r\nHost: t\r\n\r\n")
            async with asyncio.timeout(10):
                while not any(e["event"] == "http_client_too_slow" for e in logs):
                    await asyncio.sleep(0.1)
            received = 0
            async with asyncio.timeout(10):
                while chunk := await reader.read(1 << 20):
                    received += len(chunk)
            writer.close()
            await writer.wait_closed()
        assert received < 64 * 1024 * 1024  # cut off before the whole answer
    finally:
        await listener.stop()


async def test_connections_past_the_cap_are_answered_503() -> None:
    """With max_connections open, one more request is answered 503 at once (uvicorn's own
    plain-text answer); it is served again once a connection closes."""
    listener = Listener(app_for(Metrics(), {}), name="test", limits=ApiConfig(max_connections=2))
    await listener.start(HOST, 0, "CDC_TEST__PORT")
    held = [await asyncio.open_connection(HOST, listener.port) for _ in range(2)]
    try:
        await asyncio.sleep(0.1)
        reply = await call(listener.port, "GET", "/health")
        assert reply.status == 503
        for _, writer in held:
            writer.close()
            await writer.wait_closed()
        held.clear()
        await asyncio.sleep(0.2)
        assert (await call(listener.port, "GET", "/health")).status == 200
    finally:
        for _, writer in held:
            writer.close()
            await writer.wait_closed()
        await listener.stop()


async def test_stop_closes_idle_connections_and_ends_busy_ones() -> None:
    """stop() refuses new connections, closes idle ones, and cancels a request still
    running once the grace period is over; a second stop is a no-op."""
    entered, cancelled = asyncio.Event(), asyncio.Event()
    router = APIRouter()

    @router.get("/hang")
    async def hang() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    app = new_app("test", ApiConfig(max_body_bytes=MAX_BODY))
    app.include_router(router)
    listener = Listener(app, name="test", grace_s=1)
    await listener.start(HOST, 0, "CDC_TEST__PORT")
    port = listener.port
    idle = await asyncio.open_connection(HOST, port)
    busy = await asyncio.open_connection(HOST, port)
    try:
        busy[1].write(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(entered.wait(), timeout=5)
        await asyncio.wait_for(listener.stop(), timeout=5)
        assert cancelled.is_set()
        assert await asyncio.wait_for(idle[0].read(), timeout=5) == b""
    finally:
        for _, writer in (idle, busy):
            writer.close()
            await writer.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, port)
    await listener.stop()


async def test_a_port_in_use_is_a_fatal_error_naming_the_setting() -> None:
    """Binding a port another socket holds raises FatalError naming the setting."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        listener = Listener(app_for(Metrics(), {}), name="test")
        with pytest.raises(FatalError, match="CDC_API__HOST/PORT"):
            await listener.start(HOST, taken.getsockname()[1], "CDC_API__HOST/PORT")
    with pytest.raises(RuntimeError):
        _ = listener.port
