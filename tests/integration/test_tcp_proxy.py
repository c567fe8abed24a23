"""The chaos tests' TCP proxy does what they rely on: forward, delay, reset, refuse."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """A loopback echo server; yields its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def round_trip(port: int, payload: bytes = b"ping") -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.monotonic()
    writer.write(payload)
    data = await reader.readexactly(len(payload))
    took = time.monotonic() - began
    writer.close()
    return data, took


async def test_forwards_and_delays(echo: int) -> None:
    """Bytes pass unchanged both ways; with latency set, each direction is held back by it."""
    async with TcpProxy("127.0.0.1", echo) as proxy:
        assert (await round_trip(proxy.port))[0] == b"ping"
        proxy.latency_s = 0.2
        data, took = await round_trip(proxy.port, b"x" * 200_000)
        assert data == b"x" * 200_000
        assert took >= 0.4  # 0.2 s there and 0.2 s back


async def test_cut_resets_open_connections(echo: int) -> None:
    """cut() resets every open connection: the client's next read fails or sees the end."""
    async with TcpProxy("127.0.0.1", echo) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        assert proxy.cut() == 1
        await asyncio.sleep(0.05)  # the reset reaches the client
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        writer.close()


async def test_refuse_then_accept_again(echo: int) -> None:
    """While refusing, connecting fails; after start() the same port forwards again."""
    async with TcpProxy("127.0.0.1", echo) as proxy:
        port = proxy.port
        await proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        await proxy.start()
        assert proxy.port == port
        assert (await round_trip(port))[0] == b"ping"
