"""A tiny HTTP/1.1 server on asyncio streams for the worker's operational API.

One request per connection (every response says `Connection: close`), Content-Length bodies
only. Enough for probes, Prometheus scrapes and a small JSON API; not a general web server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import structlog

from cdc_sink.decode.nesting import MAX_NESTING, deeper_than
from cdc_sink.errors import TransientError
from cdc_sink.ops.metrics import Metrics

__all__ = ["HttpError", "HttpServer", "Request", "Response", "add_standard_routes", "json_response"]

log = structlog.get_logger(__name__)

MAX_BODY = 1024 * 1024
_REQUEST_LINE = re.compile(r"([A-Z]+) (\S+) HTTP/1\.[01]")
_REASONS = {status.value: status.phrase for status in HTTPStatus}


class HttpError(Exception):
    """Raised by the server or a handler to answer `status` with a JSON error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


BIGINT_MAX = 2**63 - 1  # ids are PostgreSQL bigints


def int_param(raw: Any, name: str, low: int = 1, high: int = BIGINT_MAX) -> int:
    """`raw` (query or path text) as an integer in [low, high], or a 400 naming `name`."""
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise HttpError(400, f"{name} must be a whole number, not {raw!r}") from None
    if not low <= value <= high:
        raise HttpError(400, f"{name} must be between {low} and {high}")
    return value


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request. Header names are lower-case; `query` comes from `parse_qs`."""

    method: str
    path: str
    path_params: dict[str, str]
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON; raises HttpError(400) if it is not valid JSON or nests
        deeper than MAX_NESTING levels (handlers may walk it)."""
        too_deep = f"JSON body nests deeper than {MAX_NESTING} levels"
        try:
            body = json.loads(self.body)
        except ValueError as exc:
            raise HttpError(400, f"invalid JSON body: {exc}") from exc
        except RecursionError:  # far deeper: the parser ran out of stack
            raise HttpError(400, too_deep) from None
        if deeper_than(body):
            raise HttpError(400, too_deep)
        return body


@dataclass(frozen=True, slots=True)
class Response:
    """What a handler answers; the server adds Content-Length and `Connection: close`."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


def json_response(obj: Any, status: int = 200) -> Response:
    """`obj` as a JSON body; values JSON cannot encode (datetime, UUID, …) become str()."""
    body = json.dumps(obj, default=str).encode()
    return Response(status=status, body=body, content_type="application/json")


def _error(status: int, message: str) -> Response:
    return json_response({"error": message}, status=status)


class HttpServer:
    """Routes requests to handlers. `read_timeout` bounds how long one request may take to
    arrive, so a slow or silent client cannot pin a connection."""

    def __init__(self, *, read_timeout: float = 10.0, max_body: int = MAX_BODY) -> None:
        self._read_timeout = read_timeout
        self._max_body = max_body
        self._routes: dict[tuple[str, ...], dict[str, Handler]] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    def route(self, method: str, path: str, handler: Handler) -> None:
        """Register `handler` for `method path`; a `{name}` segment matches any one segment."""
        pattern = tuple(path.strip("/").split("/"))
        self._routes.setdefault(pattern, {})[method.upper()] = handler

    @property
    def port(self) -> int:
        """The bound port (useful after `start(port=0)`); raises RuntimeError if not started."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("HttpServer is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (0 = an ephemeral port). Returns once the socket is bound."""
        self._server = await asyncio.start_server(self._serve, host, port)

    async def stop(self) -> None:
        """Close the listener and every open connection. Safe to call twice or if never started."""
        server, self._server = self._server, None
        if server is None:
            return
        # Close and cancel before the first await, so a cancelled stop() still releases all.
        server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            try:
                async with asyncio.timeout(self._read_timeout):
                    request = await self._read_request(reader)
            except HttpError as exc:
                response = _error(exc.status, str(exc))
            except TimeoutError:
                response = _error(408, "request not received in time")
            else:
                response = await self._dispatch(request)
            writer.write(_encode(response))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nobody to answer
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise HttpError(431, "request head too large") from exc
        lines = head.decode("latin-1").split("\r\n")
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise HttpError(400, "malformed request line")
        method, target = match.groups()
        headers: dict[str, str] = {}
        for line in lines[1:-2]:  # the head ends with two empty lines after the split
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise HttpError(400, "malformed header line")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:  # chunked bodies: not worth it for this API
            raise HttpError(501, "only Content-Length bodies are supported")
        length_text = headers.get("content-length", "0")
        if not (length_text.isascii() and length_text.isdigit()):
            raise HttpError(400, "invalid Content-Length")
        length = int(length_text)
        if length > self._max_body:
            raise HttpError(413, f"body larger than {self._max_body} bytes")
        body = await reader.readexactly(length)
        url = urlsplit(target)
        if not url.path.startswith("/"):
            raise HttpError(400, "request target must be an absolute path")
        query = parse_qs(url.query, keep_blank_values=True)
        return Request(method, url.path, {}, query, headers, body)

    async def _dispatch(self, request: Request) -> Response:
        segments = request.path.strip("/").split("/")
        allowed: list[str] = []
        for pattern, methods in self._routes.items():
            params = _match(pattern, segments)
            if params is None:
                continue
            handler = methods.get(request.method)
            if handler is None:
                allowed.extend(methods)
                continue
            try:
                return await handler(replace(request, path_params=params))
            except HttpError as exc:
                return _error(exc.status, str(exc))
            except TransientError as exc:  # e.g. no connection came free in time
                return replace(_error(503, str(exc)), headers={"Retry-After": "1"})
            except Exception:
                log.exception("http_handler_failed", method=request.method, path=request.path)
                return _error(500, "internal server error")
        if allowed:
            denied = _error(405, f"method {request.method} not allowed")
            return replace(denied, headers={"Allow": ", ".join(sorted(allowed))})
        return _error(404, f"no route for {request.path}")


def _match(pattern: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    if len(pattern) != len(segments):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, segments, strict=True):
        if want.startswith("{") and want.endswith("}") and got:
            params[want[1:-1]] = unquote(got)
        elif want != got:
            return None
    return params


def _encode(response: Response) -> bytes:
    head = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body


def add_standard_routes(
    server: HttpServer,
    metrics: Metrics,
    ready: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]],
) -> None:
    """GET /health (200 while the process runs), GET /ready (200, or 503 when `ready` says
    not ready; the body is its dict), GET /metrics (Prometheus text of `metrics`)."""

    async def health(_: Request) -> Response:
        return json_response({"status": "ok"})

    async def readiness(_: Request) -> Response:
        ok, detail = await ready()
        return json_response(detail, status=200 if ok else 503)

    async def scrape(_: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body=body, content_type=content_type)

    server.route("GET", "/health", health)
    server.route("GET", "/ready", readiness)
    server.route("GET", "/metrics", scrape)
