"""The operational HTTP server, driven over a real loopback socket by a raw HTTP client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from structlog.testing import capture_logs

from cdc_sink.ops.http import (
    HttpError,
    HttpServer,
    Request,
    Response,
    add_standard_routes,
    int_param,
)
from cdc_sink.ops.http import json_response as json_reply
from cdc_sink.ops.metrics import Metrics

HOST = "127.0.0.1"


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
    assert int(headers["content-length"]) == len(body)
    return Reply(int(status_line.split(" ")[1]), headers, body)


async def send_raw(port: int, raw: bytes) -> Reply:
    """Write `raw`, read until the server closes the connection, parse the response."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()
    return _parse(data)


async def call(port: int, method: str, target: str, body: bytes = b"") -> Reply:
    head = f"{method} {target} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n"
    return await send_raw(port, head.encode() + body)


@dataclass
class Served:
    server: HttpServer
    metrics: Metrics
    readiness: dict[str, Any]

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    metrics = Metrics()
    readiness: dict[str, Any] = {"ok": True, "detail": {"partitions": 8, "postgres": "ok"}}

    async def ready() -> tuple[bool, dict[str, Any]]:
        return readiness["ok"], readiness["detail"]

    async def job(request: Request) -> Response:
        return json_reply({"id": request.path_params["id"], "query": request.query})

    async def create(request: Request) -> Response:
        return json_reply({"received": request.json()}, status=201)

    async def explode(request: Request) -> Response:
        raise RuntimeError("postgresql://cdc_sink:s3cret@db/cdc unreachable")

    async def missing(request: Request) -> Response:
        raise HttpError(404, f"no job {request.path_params['id']}")

    server = HttpServer()
    add_standard_routes(server, metrics, ready)
    server.route("GET", "/reconciliation/jobs/{id}", job)
    server.route("POST", "/reconciliation/jobs", create)
    server.route("GET", "/explode", explode)
    server.route("DELETE", "/reconciliation/jobs/{id}", missing)
    await server.start(HOST, 0)
    try:
        yield Served(server, metrics, readiness)
    finally:
        await server.stop()


async def test_health_is_ok_and_closes_the_connection(served: Served) -> None:
    """GET /health answers 200 {"status": "ok"} as JSON with `Connection: close`."""
    reply = await call(served.port, "GET", "/health")
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["connection"] == "close"


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
    assert b"# TYPE cdc_events_processed_total counter" in reply.body


async def test_path_params_and_query_are_parsed(served: Served) -> None:
    """`{id}` captures one percent-decoded segment; the query keeps repeats and blank values."""
    reply = await call(served.port, "GET", "/reconciliation/jobs/job%2042?table=users&table=t2&x=")
    assert reply.status == 200
    assert reply.json() == {"id": "job 42", "query": {"table": ["users", "t2"], "x": [""]}}


async def test_json_body_is_parsed_for_a_post(served: Served) -> None:
    """A POSTed JSON body reaches the handler as parsed JSON via request.json()."""
    body = json.dumps({"table": "users", "strategy": "checksum"}).encode()
    reply = await call(served.port, "POST", "/reconciliation/jobs", body)
    assert reply.status == 201
    assert reply.json() == {"received": {"table": "users", "strategy": "checksum"}}


async def test_invalid_json_body_is_a_400(served: Served) -> None:
    """request.json() on a body that is not JSON answers 400 with a JSON error."""
    reply = await call(served.port, "POST", "/reconciliation/jobs", b"{not json")
    assert reply.status == 400
    assert "invalid JSON" in reply.json()["error"]


@pytest.mark.parametrize("levels", [101, 200_000])
async def test_a_json_body_nested_too_deeply_is_a_400(served: Served, levels: int) -> None:
    """A JSON body nesting deeper than MAX_NESTING levels is a 400 naming the limit, however
    deep (200,000 levels would exhaust the parser's stack), not a 500."""
    body = b"[" * levels + b"]" * levels
    reply = await call(served.port, "POST", "/reconciliation/jobs", body)
    assert reply.status == 400
    assert "nest" in reply.json()["error"]


async def test_http_error_from_a_handler_sets_the_status(served: Served) -> None:
    """A handler raising HttpError(404, …) answers 404 with its message."""
    reply = await call(served.port, "DELETE", "/reconciliation/jobs/7")
    assert (reply.status, reply.json()) == (404, {"error": "no job 7"})


async def test_unknown_path_is_404(served: Served) -> None:
    """A path no route matches, including a missing `{id}` segment, answers 404."""
    assert (await call(served.port, "GET", "/nowhere")).status == 404
    assert (await call(served.port, "GET", "/reconciliation/jobs/7/extra")).status == 404


async def test_known_path_with_another_method_is_405(served: Served) -> None:
    """A known path with an unregistered method answers 405 listing the allowed methods."""
    reply = await call(served.port, "PUT", "/reconciliation/jobs/7")
    assert reply.status == 405
    assert reply.headers["allow"] == "DELETE, GET"


async def test_body_over_the_limit_is_413_without_reading_it(served: Served) -> None:
    """A Content-Length above 1 MiB answers 413 before any body byte is sent."""
    head = b"POST /reconciliation/jobs HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n"
    reply = await send_raw(served.port, head)
    assert reply.status == 413


async def test_body_at_the_limit_is_accepted(served: Served) -> None:
    """A body of exactly 1 MiB is read and handed to the handler."""
    body = json.dumps("x" * (1024 * 1024 - 2)).encode()
    assert len(body) == 1024 * 1024
    reply = await call(served.port, "POST", "/reconciliation/jobs", body)
    assert reply.status == 201


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health\r\n\r\n",
        b"get /health HTTP/1.1\r\n\r\n",
        b"GET /health HTTP/2\r\n\r\n",
        b"GET health HTTP/1.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nno-colon-here\r\n\r\n",
        b"GET /health HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",
    ],
)
async def test_malformed_request_is_400(served: Served, raw: bytes) -> None:
    """A malformed request line, header line or Content-Length answers 400."""
    reply = await send_raw(served.port, raw)
    assert reply.status == 400
    assert "error" in reply.json()


async def test_chunked_body_is_501(served: Served) -> None:
    """A Transfer-Encoding body is refused with 501 rather than misread."""
    raw = b"POST /reconciliation/jobs HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert (await send_raw(served.port, raw)).status == 501


async def test_handler_exception_is_500_json_and_logged(served: Served) -> None:
    """A handler that raises answers 500 with a JSON error that leaks nothing, and is logged."""
    with capture_logs() as logs:
        reply = await call(served.port, "GET", "/explode")
    assert (reply.status, reply.json()) == (500, {"error": "internal server error"})
    assert b"s3cret" not in reply.body
    failed = [entry for entry in logs if entry["event"] == "http_handler_failed"]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "error"
    assert failed[0]["path"] == "/explode"
    assert failed[0]["exc_info"] is True


async def test_slow_client_gets_408_and_is_disconnected() -> None:
    """A client that never finishes its request is answered 408 and cut off after read_timeout."""
    server = HttpServer(read_timeout=0.2)
    await server.start(HOST, 0)
    try:
        loop = asyncio.get_running_loop()
        for partial in (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n", b"POST / HTTP/1.1\r\n"):
            reader, writer = await asyncio.open_connection(HOST, server.port)
            try:
                writer.write(partial)
                started = loop.time()
                data = await asyncio.wait_for(reader.read(), timeout=5)
                assert loop.time() - started < 2
            finally:
                writer.close()
                await writer.wait_closed()
            assert _parse(data).status == 408
    finally:
        await server.stop()


async def test_stop_closes_listener_idle_and_busy_connections() -> None:
    """stop() cancels in-flight handlers, closes open connections and refuses new ones."""
    server = HttpServer()
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(_: Request) -> Response:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    server.route("GET", "/hang", hang)
    await server.start(HOST, 0)
    port = server.port
    idle = await asyncio.open_connection(HOST, port)
    busy = await asyncio.open_connection(HOST, port)
    try:
        busy[1].write(b"GET /hang HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(entered.wait(), timeout=5)
        await asyncio.wait_for(server.stop(), timeout=5)
        assert cancelled.is_set()
        assert await asyncio.wait_for(idle[0].read(), timeout=5) == b""
        assert await asyncio.wait_for(busy[0].read(), timeout=5) == b""
    finally:
        for _, writer in (idle, busy):
            writer.close()
            await writer.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, port)
    await server.stop()  # a second stop is a no-op
    with pytest.raises(RuntimeError):
        _ = server.port


@pytest.mark.parametrize(
    ("raw", "low", "high", "message"),
    [
        ("abc", 1, 10, "n must be a whole number, not 'abc'"),
        ("1.5", 1, 10, "n must be a whole number, not '1.5'"),
        (None, 1, 10, "n must be a whole number, not None"),
        ("0", 1, 10, "n must be between 1 and 10"),
        ("11", 1, 10, "n must be between 1 and 10"),
        (str(2**63), 1, 2**63 - 1, "n must be between 1 and 9223372036854775807"),
    ],
)
def test_int_param_answers_400_naming_the_parameter(
    raw: Any, low: int, high: int, message: str
) -> None:
    """Numbers out of range reach no query: PostgreSQL would refuse them (a 500 before)."""
    with pytest.raises(HttpError) as caught:
        int_param(raw, "n", low, high)
    assert (caught.value.status, str(caught.value)) == (400, message)


def test_int_param_accepts_the_bounds() -> None:
    assert int_param("1", "n", 1, 10) == 1
    assert int_param(10, "n", 1, 10) == 10
