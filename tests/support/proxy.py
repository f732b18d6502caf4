"""A small TCP proxy between a client and the broker, for network faults in tests.

    with TcpProxy() as proxy:           # forwards 127.0.0.1:<port> -> 127.0.0.1:5672
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
        ...
        proxy.blackhole()               # keep every socket open, forward nothing
        proxy.reset()                   # close every client connection now
        proxy.pass_through()            # forward again (new connections work)
        proxy.cut_after(8)              # close each connection once the client sent 8+ bytes

The proxy runs an asyncio loop in a daemon thread; every method is safe to call from the
test's thread (or from its event loop) and returns once the change is in effect. `stop()`
closes all sockets and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Literal

__all__ = ["TcpProxy"]

Mode = Literal["pass", "blackhole", "cut"]

_CHUNK = 65_536


class TcpProxy:
    """Forwards local connections to `target_host:target_port`, with fault modes."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5672) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.mode: Mode = "pass"
        self.cut_bytes = 0
        self.port = 0
        self.accepted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"<TcpProxy :{self.port} -> {self.target_host}:{self.target_port} mode={self.mode} "
            f"accepted={self.accepted} open_sockets={len(self._writers)}>"
        )

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- control, from any thread -------------------------------------------------------------

    def start(self) -> int:
        """Start listening on a free local port; returns the port."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self._server = self._call(self._listen())
        return self.port

    def pass_through(self) -> None:
        """Forward bytes both ways (the initial mode)."""
        self.mode = "pass"

    def blackhole(self) -> None:
        """Stop forwarding and drop what arrives, keeping every socket open (half-open TCP)."""
        self.mode = "blackhole"

    def cut_after(self, client_bytes: int) -> None:
        """Let each connection's client send `client_bytes` bytes, then reset the connection
        when it sends more (8 is the AMQP protocol header: the cut falls in the handshake)."""
        self.cut_bytes = client_bytes
        self.mode = "cut"

    @property
    def running(self) -> bool:
        """Whether the proxy's thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def open_connections(self) -> int:
        """Client connections the proxy holds open right now."""
        return len(self._writers) // 2

    def reset(self) -> None:
        """Close every current connection now, both sides; the proxy keeps accepting new ones.

        Data dropped in blackhole mode has corrupted those streams anyway, so a reset is the
        way back to a usable connection: the mode returns to pass-through.
        """
        self._call(self._close_all())
        self.mode = "pass"

    def stop(self) -> None:
        """Close the listening socket and all connections, and end the proxy's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    # -- the proxy, on its own loop -------------------------------------------------------------

    def _call(self, coroutine):  # type: ignore[no-untyped-def]
        assert self._loop is not None, "the proxy is not started"
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _listen(self) -> asyncio.Server:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, upstream=True)),
            asyncio.create_task(self._pump(up_reader, writer, upstream=False)),
        ]
        self._tasks.update(pumps)
        try:
            # When one direction ends, the other has nothing left to talk to.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            for side in (writer, up_writer):
                self._writers.discard(side)
                side.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while chunk := await reader.read(_CHUNK):
                if self.mode == "blackhole":
                    continue
                if self.mode == "cut" and upstream and sent + len(chunk) > self.cut_bytes:
                    return  # the connection handler closes both sides
                sent += len(chunk)
                writer.write(chunk)
                await writer.drain()

    async def _close_all(self) -> None:
        writers, self._writers = self._writers, set()
        for writer in writers:
            writer.transport.abort()
        # Let the connection handlers see their sockets closed and finish.
        tasks = set(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._close_all()
        if self._server is not None:
            await self._server.wait_closed()
