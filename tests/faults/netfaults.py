"""The test TCP proxy (tests/support/proxy.py) with two more faults: latency and a one-shot cut.

    with FaultProxy(target_port=node.port) as proxy:
        proxy.delay(0.3)                      # every byte arrives 0.3 s late, both ways
        proxy.cut_once("down", 150_000)       # the next 150,000 bytes from the broker pass,
                                              # then that connection is reset mid-stream
        proxy.wait_cut(timeout=10)            # returns once the cut happened
        proxy.partition()                     # forward nothing, and hide closes: a socket
                                              # the broker closed stays open to the client
        proxy.heal()                          # forward again; connections that lost bytes
                                              # in the partition are reset

Latency keeps the byte order and the throughput: each chunk is stamped when it arrives and
written `delay` seconds later by a courier task per direction, so a burst is not serialised
into one delay per chunk. A one-shot cut disarms itself once it fired, so the client's next
connection works (a fault, then recovery, as a real network does).

A partition differs from the base proxy's blackhole in what the client sees when the broker
gives up on the connection: with `blackhole()` the broker's close is passed on (the client
learns of it at once), with `partition()` it is not, so only the client's own heartbeat
check can find the connection dead (half-open TCP). When the partition heals, the streams
that lost bytes are reset, as TCP would once its retransmissions reached a peer that has
forgotten the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Literal

from support.proxy import TcpProxy

__all__ = ["Direction", "FaultProxy"]

Direction = Literal["up", "down"]

_CHUNK = 65_536
#: How long a closing direction may take to deliver what it still holds (delayed bytes).
_FLUSH_LIMIT = 10.0


class FaultProxy(TcpProxy):
    """TcpProxy plus `delay(seconds)` and `cut_once(direction, after_bytes)`."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5672) -> None:
        super().__init__(target_host, target_port)
        self.latency = 0.0
        self.cuts = 0
        self._cut: tuple[Direction, int] | None = None
        self._cut_fired = threading.Event()
        self.partitioned = False
        #: When (the loop's clock: time.monotonic()) each close by the broker was hidden.
        self.hidden_closes: list[float] = []
        self._tainted: set[asyncio.StreamWriter] = set()
        self._healed: asyncio.Event | None = None  # lives on the proxy's loop

    def delay(self, seconds: float) -> None:
        """Deliver every chunk `seconds` late, in both directions (0: no delay)."""
        self.latency = max(0.0, seconds)

    def cut_once(self, direction: Direction, after_bytes: int) -> None:
        """Let `after_bytes` more bytes flow in `direction` (summed over connections), then
        reset the connection that carries the next byte, exactly at that byte."""
        self._cut_fired.clear()
        self._cut = (direction, after_bytes)

    def wait_cut(self, timeout: float) -> bool:
        """Wait until the armed cut fired; whether it did."""
        return self._cut_fired.wait(timeout)

    def partition(self) -> None:
        """Forward nothing and keep every client socket open, whatever the broker does."""
        self._call(self._partition())

    async def _partition(self) -> None:
        self._healed = asyncio.Event()
        self.partitioned = True
        self.blackhole()

    def heal(self) -> None:
        """End the partition: forward again, and reset the connections that lost bytes."""
        self._call(self._heal())

    async def _heal(self) -> None:
        self.partitioned = False
        self.mode = "pass"
        if self._healed is not None:
            self._healed.set()
        tainted, self._tainted = self._tainted, set()
        for writer in tainted:
            writer.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        direction: Direction = "up" if upstream else "down"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def courier() -> None:
            while (item := await queue.get()) is not None:
                due, chunk = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()

        delivering = asyncio.create_task(courier())
        sent = 0
        try:
            with contextlib.suppress(OSError):
                while chunk := await reader.read(_CHUNK):
                    if delivering.done():
                        return  # the far side is gone
                    if self.mode == "blackhole":
                        self._tainted.add(writer)
                        continue
                    if self.mode == "cut" and upstream and sent + len(chunk) > self.cut_bytes:
                        return  # the base proxy's persistent cut (client bytes only)
                    chunk, cut = self._take_cut(direction, chunk)
                    sent += len(chunk)
                    if chunk:
                        queue.put_nowait((loop.time() + self.latency, chunk))
                    if cut:
                        break
            if self.partitioned and not upstream and self._healed is not None:
                # The broker closed its side; the partition keeps the client from knowing.
                self.hidden_closes.append(loop.time())
                await self._healed.wait()
                return
            # End of stream or a cut: deliver what is in flight, then the handler closes both
            # sides (a cut lands exactly after the allowed bytes, mid-frame).
            queue.put_nowait(None)
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(delivering), _FLUSH_LIMIT)
        finally:
            delivering.cancel()
            with contextlib.suppress(BaseException):
                await delivering

    def _take_cut(self, direction: Direction, chunk: bytes) -> tuple[bytes, bool]:
        """The part of `chunk` that may pass, and whether the armed cut fires on it."""
        armed = self._cut
        if armed is None or armed[0] != direction:
            return chunk, False
        budget = armed[1]
        if len(chunk) <= budget:
            self._cut = (direction, budget - len(chunk))
            return chunk, False
        self._cut = None
        self.cuts += 1
        self._cut_fired.set()
        return chunk[:budget], True
