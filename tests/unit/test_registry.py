"""ConfluentRegistry: HTTP answers map onto the sink's error kinds; one request per schema id."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Callable
from typing import Any

import httpx2 as httpx
import pytest

from cdc_sink.decode.registry import UNKNOWN_ID_WAIT, ConfluentRegistry, OnceCache, Refusals
from cdc_sink.errors import DecodeError, FatalError, TransientError
from cdc_sink.retry import RetryPolicy

SCHEMA = '{"type": "record", "name": "R", "fields": []}'


def serving(
    answer: Callable[[httpx.Request], httpx.Response], **options: Any
) -> tuple[ConfluentRegistry, list[str]]:
    """A registry client whose network is `answer`, and the list of paths it requested."""
    paths: list[str] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        await asyncio.sleep(0.01)  # long enough for concurrent callers to overlap
        return answer(request)

    transport = httpx.MockTransport(handle)
    url = "https://user:s3cret@sr.example/api/"
    return ConfluentRegistry(url, transport=transport, **options), paths


def quick_waits(retries: int) -> RetryPolicy:
    """Ask an unknown id `retries` more times, 10 ms apart."""
    return RetryPolicy(attempts=retries + 1, base_s=0.01, cap_s=0.01, jitter=False)


def registry_error(status: int, code: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error_code": code, "message": message})


async def test_fetches_the_schema_text_once_per_id() -> None:
    """Repeated and concurrent lookups of one id make a single GET /schemas/ids/{id}."""
    registry, paths = serving(lambda _: httpx.Response(200, json={"schema": SCHEMA}))
    async with registry:
        texts = await asyncio.gather(*(registry.schema_by_id(42) for _ in range(20)))
        assert await registry.schema_by_id(42) == SCHEMA
    assert set(texts) == {SCHEMA}
    assert paths == ["/api/schemas/ids/42"]


async def test_unknown_id_is_poison_after_asking_again() -> None:
    """404 / 40403 is asked again after each retry delay, then is a DecodeError naming the id;
    within the TTL the next lookup fails without a request, after it the id is asked again."""
    registry, paths = serving(
        lambda _: registry_error(404, 40403, "Schema 7 not found."),
        unknown_id_wait=quick_waits(2),
        unknown_id_ttl=0.2,
    )
    async with registry:
        for _ in range(2):
            with pytest.raises(DecodeError, match=r"unknown schema id 7 .*Schema 7 not found"):
                await registry.schema_by_id(7)
        assert len(paths) == 3
        await asyncio.sleep(0.25)
        with pytest.raises(DecodeError, match="unknown schema id 7"):
            await registry.schema_by_id(7)
    assert len(paths) == 6


def test_an_unknown_id_is_asked_twice_more_a_quarter_and_a_whole_second_later() -> None:
    """By default the registry is asked three times in all, 0.25 s and 1 s apart."""
    assert [UNKNOWN_ID_WAIT.delay(attempt) for attempt in range(2)] == [0.25, 1.0]
    assert [UNKNOWN_ID_WAIT.gives_up(failures) for failures in (1, 2, 3)] == [False, False, True]


async def test_an_id_that_appears_on_a_later_ask_is_found() -> None:
    """A schema the registry only knows from the second request on is not poison."""
    found = httpx.Response(200, json={"schema": SCHEMA})
    answers = iter([registry_error(404, 40403, "not yet"), found])
    registry, paths = serving(lambda _: next(answers), unknown_id_wait=quick_waits(1))
    async with registry:
        assert await registry.schema_by_id(9) == SCHEMA
    assert len(paths) == 2


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
async def test_server_trouble_is_transient(status: int) -> None:
    """5xx, 408 and 429 answers are TransientError: the caller retries."""
    registry, _ = serving(lambda _: registry_error(status, 50001, "store unavailable"))
    async with registry:
        with pytest.raises(TransientError, match=f"HTTP {status} .*store unavailable"):
            await registry.schema_by_id(1)


@pytest.mark.parametrize(
    "failure",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
)
async def test_transport_failures_are_transient(failure: httpx.HTTPError) -> None:
    """Connection errors and timeouts are TransientError, without the URL's password."""

    def fail(_: httpx.Request) -> httpx.Response:
        raise failure

    registry, _ = serving(fail)
    async with registry:
        with pytest.raises(
            TransientError, match=re.escape("https://sr.example/api unreachable")
        ) as raised:
            await registry.schema_by_id(1)
    assert "s3cret" not in str(raised.value)


async def test_a_closed_port_is_transient() -> None:
    """A registry that is not listening at all is TransientError, over a real socket."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but never listening: connections are refused
        async with ConfluentRegistry(f"http://127.0.0.1:{port}", timeout=2.0) as registry:
            with pytest.raises(TransientError, match="unreachable"):
                await registry.schema_by_id(1)


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_are_fatal(status: int) -> None:
    """401 and 403 are FatalError: retrying or skipping records cannot fix credentials."""
    registry, _ = serving(lambda _: registry_error(status, 40101, "Unauthorized"))
    async with registry:
        with pytest.raises(FatalError, match=f"HTTP {status}"):
            await registry.schema_by_id(1)


async def test_non_avro_schemas_are_poison() -> None:
    """A Protobuf or JSON Schema id cannot be read as Avro: DecodeError."""
    answer = httpx.Response(200, json={"schema": "syntax = 'proto3';", "schemaType": "PROTOBUF"})
    registry, _ = serving(lambda _: answer)
    async with registry:
        with pytest.raises(DecodeError, match="schema id 3 is a PROTOBUF schema"):
            await registry.schema_by_id(3)


async def test_an_answer_without_a_schema_is_fatal() -> None:
    """A 200 that carries no schema (wrong URL, a proxy's page) is FatalError."""
    registry, _ = serving(lambda _: httpx.Response(200, text="<html>login</html>"))
    async with registry:
        with pytest.raises(FatalError, match=r"without a schema.*<html>"):
            await registry.schema_by_id(3)


def test_rejects_urls_that_are_not_http() -> None:
    """A URL without http(s) scheme and host fails at construction, not at the first record."""
    with pytest.raises(ValueError, match="must be http"):
        ConfluentRegistry("localhost:8081")


async def test_once_cache_survives_a_cancelled_waiter() -> None:
    """Cancelling one waiter neither cancels the shared load nor loses its value."""
    cache: OnceCache[str, str] = OnceCache()
    release = asyncio.Event()
    loads = 0

    async def load() -> str:
        nonlocal loads
        loads += 1
        await release.wait()
        return json.dumps(loads)

    first = asyncio.create_task(cache.get("k", load))
    second = asyncio.create_task(cache.get("k", load))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert await second == "1"
    assert await cache.get("k", load) == "1"
    assert loads == 1
    with pytest.raises(asyncio.CancelledError):
        await first


def test_refusals_keep_at_most_their_size_dropping_the_least_recently_used() -> None:
    """A bounded refusal cache forgets the key used longest ago, and forgets keys past the TTL."""
    refusals: Refusals[int] = Refusals(ttl=60, size=3)
    for key in (1, 2, 3):
        refusals.add(key, f"no {key}")
    assert refusals.get(1) == "no 1"  # 1 is now the most recently used
    refusals.add(4, "no 4")
    assert len(refusals) == 3
    assert [refusals.get(k) for k in (1, 2, 3, 4)] == ["no 1", None, "no 3", "no 4"]
    expiring: Refusals[int] = Refusals(ttl=0, size=3)
    expiring.add(1, "no")
    assert expiring.get(1) is None


async def test_ids_unknown_in_a_flood_are_refused_without_waiting() -> None:
    """Once `flood_ids` ids proved unknown within the TTL, a new unknown id is refused at the
    first answer (no delays, one request); the unknown ids remembered stay bounded."""
    registry, paths = serving(
        lambda _: registry_error(404, 40403, "not found"),
        unknown_id_wait=quick_waits(2),
        flood_ids=3,
        max_unknown_ids=5,
    )
    async with registry:
        for schema_id in range(20):
            with pytest.raises(DecodeError, match=f"unknown schema id {schema_id} "):
                await registry.schema_by_id(schema_id)
        assert registry.waited_ids == 3
        assert len(paths) == 3 * 3 + 17
        assert registry.unknown_ids == 5


async def test_a_flood_ends_once_its_ids_are_older_than_the_ttl() -> None:
    """After the TTL without new unknown ids, an unknown id is waited for again."""
    registry, _ = serving(
        lambda _: registry_error(404, 40403, "not found"),
        unknown_id_wait=quick_waits(1),
        unknown_id_ttl=0.2,
        flood_ids=2,
    )
    async with registry:
        for schema_id in (1, 2, 3):
            with pytest.raises(DecodeError):
                await registry.schema_by_id(schema_id)
        assert registry.waited_ids == 2
        await asyncio.sleep(0.25)
        with pytest.raises(DecodeError):
            await registry.schema_by_id(4)
        assert registry.waited_ids == 3
