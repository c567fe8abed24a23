"""The worker's HTTP listeners: FastAPI applications served by uvicorn in the worker's loop.

Two listeners: probes and metrics (/health, /ready, /metrics), and the control API (the DLQ and
reconciliation routes, each package registering its own APIRouter). Every error answers JSON
`{"error": message}`: 400 for a body or query that does not validate, 404 for an unknown route
or record, 405 for a known path with another method, 413 for a body over the limit, 503 with
`Retry-After` when a transient failure (no connection free in time) stops a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import structlog
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BeforeValidator
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from cdc_sink.arguments import BIGINT_MAX
from cdc_sink.config import ApiConfig
from cdc_sink.decode.nesting import MAX_NESTING, deeper_than
from cdc_sink.errors import FatalError, TransientError
from cdc_sink.ops.metrics import Metrics

__all__ = [
    "BIGINT_MAX",
    "ApiError",
    "JsonRoute",
    "Listener",
    "json_response",
    "new_app",
    "probe_routes",
    "whole",
]

log = structlog.get_logger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class ApiError(HTTPException):
    """`ApiError(status, message, headers)`, raised by a route: the answer is `status` with
    `{"error": message}`."""


def whole(name: str, low: int = 1, high: int = BIGINT_MAX) -> BeforeValidator:
    """For `Annotated[int, whole(...)]`: a query, path or body value that must be a whole
    number in [low, high]; otherwise a 400 naming `name` (and the text given)."""

    def check(raw: Any) -> int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(f"{name} must be a whole number, not {raw!r}")
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a whole number, not {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low} and {high}")
        return value

    return BeforeValidator(check)


class JsonRoute(APIRoute):
    """A route whose body is read as JSON whatever Content-Type the client names (clients
    of the earlier server send none or a form type), and refused with 400 when it is not
    JSON or nests deeper than MAX_NESTING levels, before any model walks it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parsed_first(request: Request) -> Response:
            body = await request.body()
            if body:
                too_deep = f"JSON body nests deeper than {MAX_NESTING} levels"
                try:
                    document = json.loads(body)
                except RecursionError:  # far deeper: the parser ran out of stack
                    raise ApiError(400, too_deep) from None
                except ValueError as exc:
                    raise ApiError(400, f"invalid JSON body: {exc}") from None
                if deeper_than(document):
                    raise ApiError(400, too_deep)
                request._json = document  # what FastAPI's own parsing will find
                request.scope["headers"] = [
                    *((k, v) for k, v in request.scope["headers"] if k != b"content-type"),
                    (b"content-type", b"application/json"),
                ]
            return await handler(request)

        return parsed_first


def json_response(obj: Any, status: int = 200) -> Response:
    """`obj` as a JSON body; values JSON cannot encode (datetime, UUID, …) become str()."""
    body = json.dumps(obj, default=str)
    return Response(body, status_code=status, media_type="application/json")


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        if error.get("type") == "value_error":  # from whole() and model validators: says all
            parts.append(str(error["ctx"]["error"]))
            continue
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def new_app(title: str, limits: ApiConfig | None = None) -> FastAPI:
    """An application whose errors all answer `{"error": …}`; OpenAPI at /openapi.json and
    docs at /docs. Of `limits` (ApiConfig's defaults if None): a body over `max_body_bytes` is
    answered 413, headers over `max_header_bytes` 431, a body not arrived `request_timeout_s`
    after the head 408 (and the connection closed: a client that sends slowly or not at all
    is let go). A route that fails unforeseen is answered 500. Each request gets a request id
    (the client's X-Request-ID if it is a plain token, else a new one), bound to every log
    line written for it and sent back."""
    app = FastAPI(title=title, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        return error_response(400, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route for {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed"
        return error_response(exc.status_code, message, exc.headers)

    @app.exception_handler(TransientError)
    async def unavailable(_: Request, exc: TransientError) -> Response:
        return error_response(503, str(exc), {"Retry-After": "1"})

    app.add_middleware(_RequestGuard, limits=limits or ApiConfig())
    return app


class _RequestGuard:
    """ASGI middleware: the request id (bound to the log context, sent back as X-Request-ID),
    the header and body caps (413 before reading when Content-Length says too much, and as
    soon as a chunked body passes the cap), the body's deadline, and the 500 answer of an
    unforeseen failure."""

    def __init__(self, app: ASGIApp, *, limits: ApiConfig) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.limits
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get(b"x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        too_large = f"body larger than {limits.max_body_bytes} bytes"
        deadline = asyncio.get_running_loop().time() + limits.request_timeout_s
        received = 0
        body_complete = started = False

        async def capped_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:  # later reads wait for the client to go away: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                late = "request not received in time"
                raise HTTPException(408, late, {"Connection": "close"}) from None
            body_complete = not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > limits.max_body_bytes:
                raise HTTPException(413, too_large)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            refusal = None
            if sum(len(k) + len(v) for k, v in scope["headers"]) > limits.max_header_bytes:
                refusal = error_response(
                    431, f"headers larger than {limits.max_header_bytes} bytes"
                )
            length = headers.get(b"content-length", "0")
            if length.isdigit() and int(length) > limits.max_body_bytes:
                refusal = error_response(413, too_large)
            try:
                await (refusal or self.app)(scope, capped_receive, send_with_id)
            except Exception as exc:
                log.error(
                    "http_handler_failed",
                    method=scope["method"],
                    path=scope["path"],
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
                if started:
                    raise  # the answer has begun: uvicorn closes the connection
                await error_response(500, "internal server error")(scope, receive, send_with_id)


def probe_routes(
    metrics: Metrics, ready: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
) -> APIRouter:
    """GET /health (200 while the process runs), GET /ready (200, or 503 when `ready` says
    not ready; the body is its dict), GET /metrics (Prometheus text of `metrics`)."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/ready")
    async def readiness() -> Response:
        ok, detail = await ready()
        return JSONResponse(detail, status_code=200 if ok else 503)

    @router.get("/metrics")
    async def scrape() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return router


class Listener:
    """One uvicorn server in the current event loop, started and stopped by the caller (no
    signal handlers of its own: the worker's graceful shutdown stops it).

    Of `limits` (ApiConfig's defaults if None): `max_connections` more at once are answered
    503; a request's head must arrive within `request_timeout_s` (else the connection is
    closed; new_app gives its body as long); an idle keep-alive connection is closed after
    `keep_alive_s`; a head over `max_header_bytes` is refused. `stop` gives requests in
    flight `grace_s` to finish."""

    def __init__(
        self, app: ASGIApp, *, name: str, limits: ApiConfig | None = None, grace_s: int = 5
    ) -> None:
        self.name = name
        self._grace_s = grace_s
        self._app = app
        self._limits = limits or ApiConfig()
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._ticks: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful after `start(port=0)`); raises RuntimeError if not started."""
        if self._socket is None:
            raise RuntimeError(f"the {self.name} listener is not started")
        return int(self._socket.getsockname()[1])

    async def start(self, host: str, port: int, setting: str) -> None:
        """Listen on host:port (0 = an ephemeral port); returns once the socket is bound.
        FatalError naming `setting` if it cannot be bound."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise FatalError(
                f"cannot listen on {host}:{port} ({setting}): {exc}", stage="http"
            ) from exc
        limits = self._limits
        config = uvicorn.Config(
            self._app,
            http=_head_timed(limits.request_timeout_s),
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=self._grace_s,
            limit_concurrency=limits.max_connections,
            h11_max_incomplete_event_size=limits.max_header_bytes,
            timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
        )
        config.load()
        self._server = uvicorn.Server(config)
        # What Server.serve() would do besides installing its own signal handlers.
        self._server.lifespan = config.lifespan_class(config)
        self._socket = sock
        await self._server.startup(sockets=[sock])
        # uvicorn's tick keeps the Date header current and notices should_exit.
        self._ticks = asyncio.create_task(self._server.main_loop())

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish (`grace_s` at most, then they are
        cancelled), close every connection. Safe to call twice or if never started."""
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._ticks is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticks
        sockets = [self._socket] if self._socket is not None else None
        await server.shutdown(sockets=sockets)


def _head_timed(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with deadlines: a client that starts a request and does not
    finish its head in `timeout_s` (slowloris), or does not take an answer it is sent (the
    socket stays full that long), is disconnected, so it cannot hold one of the listener's
    connections, or the answer's memory, for ever."""

    class HeadTimedH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(timeout_s, self._write_late)

        def resume_writing(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().resume_writing()

        def _write_late(self) -> None:
            self._write_timer = None
            log.warning("http_client_too_slow", timeout_s=timeout_s)
            self.transport.abort()  # close() would wait for the client to read

        def _awaiting_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self._awaiting_head():
                self._head_timer = self.loop.call_later(timeout_s, self._head_late)
            super().data_received(data)
            if self._head_timer is not None and not self._awaiting_head():
                self._head_timer.cancel()
                self._head_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._head_timer, self._write_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._write_timer = None
            super().connection_lost(exc)

        def _head_late(self) -> None:
            self._head_timer = None
            if self._awaiting_head():
                self.transport.close()

    return HeadTimedH11
