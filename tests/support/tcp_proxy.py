"""A TCP proxy for chaos tests: forwards a loopback port to a service and misbehaves on demand.

It can add latency to every byte in both directions, cut every open connection at once (the
peers see a reset, as after a network failure), and refuse new connections for a while (the
port is closed, as while a host reboots). It runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class TcpProxy:
    """127.0.0.1:`port` → upstream, with faults. `port=0` picks a free port."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.latency_s = 0.0
        self.accepted = 0  # connections accepted so far
        self.cuts = 0  # connections cut by `cut()`
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again); new connections are accepted and forwarded."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """Close the listening socket: new connections are refused; open ones carry on."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def cut(self) -> int:
        """Reset every open connection now (both sides); return how many were open."""
        open_now = len(self._writers) // 2
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self.cuts += open_now
        return open_now

    async def outage(self, seconds: float) -> None:
        """Cut everything and refuse new connections for `seconds`, then accept again."""
        await self.refuse()
        self.cut()
        await asyncio.sleep(seconds)
        await self.start()

    async def stop(self) -> None:
        await self.refuse()
        self.cut()
        for pipe in list(self._pipes):
            pipe.cancel()
        for pipe in list(self._pipes):
            with contextlib.suppress(asyncio.CancelledError):
                await pipe

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()  # upstream is down: the client sees a reset
            return
        self._writers |= {writer, up_writer}
        for source, target in ((reader, up_writer), (up_reader, writer)):
            pipe = asyncio.create_task(self._pipe(source, target, (writer, up_writer)))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        target: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        """Copy one direction, each chunk held back by the latency at the time it arrived
        (so latency delays the bytes without capping the throughput)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                target.write(chunk)
                await target.drain()

        delivery = asyncio.create_task(deliver())
        try:
            while not delivery.done():
                chunk = await source.read(65536)
                await queue.put((time.monotonic() + self.latency_s, chunk))
                if not chunk:
                    break
            await delivery
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await delivery
            # one side is gone: reset the other, as a broken path would
            for writer in pair:
                self._writers.discard(writer)
                writer.transport.abort()
