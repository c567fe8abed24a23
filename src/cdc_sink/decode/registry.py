"""Schema registry access: what the decoder needs, and a client for the Confluent REST API.

The client speaks only `GET /schemas/ids/{id}`, which Confluent Schema Registry, Apicurio's
ccompat API, Karapace and Redpanda all serve. Schema ids are immutable: every answer is kept for
the life of the process.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable, Coroutine, Hashable
from functools import partial
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx2 as httpx

from cdc_sink.config import SchemaRegistryConfig
from cdc_sink.errors import DecodeError, FatalError, TransientError
from cdc_sink.ops.logs import get_logger
from cdc_sink.ops.tls import client_context, is_untrusted_certificate, untrusted_hint
from cdc_sink.retry import RetryPolicy

log = get_logger("cdc_sink.registry")

CA_SETTING = "CDC_SCHEMA_REGISTRY__SSL_CAFILE"
# A 404 is asked again after 0.25 s and 1 s before it counts.
UNKNOWN_ID_WAIT = RetryPolicy(attempts=3, base_s=0.25, cap_s=1.0, jitter=False, growth=4.0)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SchemaRegistry(Protocol):
    """Where writer schemas come from.

    `schema_by_id` returns the schema text (Avro JSON). It raises DecodeError when the registry
    answered that it has no such schema, TransientError when the registry could not be asked.
    """

    async def schema_by_id(self, schema_id: int) -> str: ...


class OnceCache(Generic[K, V]):
    """Values loaded at most once per key and then kept forever.

    Concurrent `get`s of a missing key share one load. A failed load is not remembered: the
    next `get` loads again. `values` may be read directly for a lock-free fast path.
    """

    def __init__(self) -> None:
        self.values: dict[K, V] = {}
        self._loading: dict[K, asyncio.Task[V]] = {}

    async def get(self, key: K, load: Callable[[], Coroutine[Any, Any, V]]) -> V:
        if key in self.values:
            return self.values[key]
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(load())
            self._loading[key] = task
            task.add_done_callback(partial(self._settle, key))
        # One waiter being cancelled must not cancel the load the other waiters share.
        return await asyncio.shield(task)

    def _settle(self, key: K, task: asyncio.Task[V]) -> None:
        del self._loading[key]
        if task.cancelled():
            return
        # Reading the exception marks it retrieved, so a load whose waiters all went away
        # does not log "exception was never retrieved".
        if task.exception() is None:
            self.values[key] = task.result()


class Refusals(Generic[K]):
    """Why keys were refused, each remembered for `ttl` seconds; at most `size` are kept, the
    least recently used dropped first (garbage headers carry endless random ids)."""

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._why: collections.OrderedDict[K, tuple[float, str]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._why)

    def get(self, key: K) -> str | None:
        """Why `key` was refused, if that is still remembered."""
        found = self._why.get(key)
        if found is None:
            return None
        if time.monotonic() >= found[0]:
            del self._why[key]
            return None
        self._why.move_to_end(key)
        return found[1]

    def add(self, key: K, why: str) -> None:
        self._why[key] = (time.monotonic() + self.ttl, why)
        self._why.move_to_end(key)
        while len(self._why) > self.size:
            self._why.popitem(last=False)


class ConfluentRegistry:
    """SchemaRegistry over the Confluent REST API, with one HTTP call per schema id.

    Answers map onto the sink's error kinds: 404 (error code 40403) and other refusals of the id
    -> DecodeError; connection failures, timeouts, 408, 429 and 5xx -> TransientError; 401, 403,
    407 and answers that are not a schema -> FatalError. A 404 is asked again as
    `unknown_id_wait` allows (a schema registered a moment ago may not have reached every
    registry node yet) before it counts, and is then remembered for `unknown_id_ttl` seconds
    (at most `max_unknown_ids` of them), so a run of such records fails fast. Once `flood_ids`
    ids have proved unknown within `unknown_id_ttl` (garbage or hostile headers carry random
    ids), a 404 counts at once: waiting for each would hold every batch that carries one. Basic
    auth is `auth` (user, password) or given in the URL (`https://user:secret@host/`); it
    never appears in error messages. An https registry's certificate is verified against
    `ca_file` (PEM; default: the system's trusted CAs); one it refuses is a FatalError.
    Call `close()` when done.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        auth: tuple[str, str] | None = None,
        ca_file: str | None = None,
        unknown_id_wait: RetryPolicy = UNKNOWN_ID_WAIT,
        unknown_id_ttl: float = 60.0,
        max_unknown_ids: int = 10_000,
        flood_ids: int = 4,
    ) -> None:
        """`transport` replaces the network, for tests."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("schema registry URL must be http(s)://host[:port][/path]")
        self._url = url.rstrip("/")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self._shown = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self._ca_file = ca_file
        self._http = httpx.AsyncClient(
            timeout=timeout,
            transport=transport,
            auth=auth,
            verify=client_context(CA_SETTING, ca_file),
            headers={"Accept": "application/vnd.schemaregistry.v1+json, application/json"},
        )
        self._texts: OnceCache[int, str] = OnceCache()
        self._unknown_wait = unknown_id_wait
        self._unknown: Refusals[int] = Refusals(unknown_id_ttl, max_unknown_ids)
        # When the last `flood_ids` ids proved unknown (monotonic time)
        self._proved_unknown: collections.deque[float] = collections.deque(maxlen=flood_ids)
        self.waited_ids = 0  # ids asked again after the delays

    @classmethod
    def from_config(cls, settings: SchemaRegistryConfig) -> ConfluentRegistry:
        """The client the CDC_SCHEMA_REGISTRY__* settings describe (URL set); ConfigError for
        a CA bundle that cannot be loaded."""
        assert settings.url is not None
        password = settings.password.reveal() if settings.password else ""
        return cls(
            settings.url,
            timeout=settings.timeout_s,
            max_unknown_ids=settings.max_unknown_ids,
            auth=(settings.username, password) if settings.username else None,
            ca_file=settings.ssl_cafile,
        )

    async def schema_by_id(self, schema_id: int) -> str:
        if schema_id not in self._texts.values and (unknown := self._unknown.get(schema_id)):
            raise DecodeError(unknown)
        return await self._texts.get(schema_id, partial(self._fetch, schema_id))

    @property
    def unknown_ids(self) -> int:
        """How many ids are remembered as unknown."""
        return len(self._unknown)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ConfluentRegistry:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _fetch(self, schema_id: int) -> str:
        where = f"schema registry {self._shown}"
        for attempt in itertools.count():
            try:
                response = await self._http.get(f"{self._url}/schemas/ids/{schema_id}")
            except httpx.HTTPError as exc:
                if is_untrusted_certificate(exc):  # retrying cannot help
                    raise FatalError(
                        f"{untrusted_hint(where, CA_SETTING, self._ca_file)}: {exc!r}",
                        stage="decode",
                    ) from exc
                raise TransientError(
                    f"{where} unreachable while fetching schema id {schema_id}: {exc!r}"
                ) from exc
            if response.status_code != 404 or self._unknown_wait.gives_up(attempt + 1):
                break
            if attempt == 0:
                if self._flooded():
                    break
                self.waited_ids += 1
            await asyncio.sleep(self._unknown_wait.delay(attempt))
        status = response.status_code
        if status == 200:
            return self._schema_text(response, schema_id, where)
        said = f"{where} answered HTTP {status} for schema id {schema_id}: {_message(response)}"
        if status in (408, 429) or status >= 500:
            raise TransientError(said)
        if status in (401, 403, 407):
            raise FatalError(
                f"{said}; check CDC_SCHEMA_REGISTRY__USERNAME and CDC_SCHEMA_REGISTRY__PASSWORD "
                "(or the user in CDC_SCHEMA_REGISTRY__URL)",
                stage="decode",
            )
        if status == 404:
            why = f"unknown schema id {schema_id} ({said})"
            self._unknown.add(schema_id, why)
            flooded = self._flooded()
            self._proved_unknown.append(time.monotonic())
            if not flooded and self._flooded():
                log.warning(
                    "schema_ids_unknown_flood",
                    unknown_ids=len(self._proved_unknown),
                    within_s=self._unknown.ttl,
                    action="ids the registry does not know are refused without waiting for it",
                )
            raise DecodeError(why)
        # Any other refusal (400, 422, ...) is about this id, which came from the record.
        raise DecodeError(said)

    def _flooded(self) -> bool:
        """Whether the last `flood_ids` ids proved unknown within the TTL."""
        proved = self._proved_unknown
        return len(proved) == proved.maxlen and proved[0] > time.monotonic() - self._unknown.ttl

    @staticmethod
    def _schema_text(response: httpx.Response, schema_id: int, where: str) -> str:
        try:
            body = response.json()
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
            raise FatalError(
                f"{where} answered schema id {schema_id} without a schema: "
                f"{response.text[:200]!r}; is the URL the registry's API root?",
                stage="decode",
            )
        kind = body.get("schemaType") or "AVRO"
        if kind != "AVRO":
            raise DecodeError(f"schema id {schema_id} is a {kind} schema; only Avro is supported")
        schema: str = body["schema"]
        return schema


def _message(response: httpx.Response) -> str:
    """The registry's own error message, or the start of the body."""
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return repr(response.text[:200])
    if isinstance(body, dict) and "message" in body:
        return f"{body['message']} (error code {body.get('error_code')})"
    return repr(response.text[:200])
