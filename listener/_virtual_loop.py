"""An event loop that skips idle waits, so that async handlers under test never sleep.

`VirtualTimeLoop.time()` is the real monotonic clock plus the time the loop has skipped.
When the loop has nothing to do but wait for its next timer, it jumps to that timer
instead of sleeping: `await asyncio.sleep(3600)` returns at once, and a handler that hangs
reaches its `timeout` at once (and is cancelled, as in production).

It jumps only when nothing but a timer can wake it: no file descriptor besides its own
wake-up pipe is watched (so no socket, pipe or subprocess is pending) and no executor job
(`asyncio.to_thread`, `run_in_executor`, DNS lookups) is running. Otherwise it waits in real
time, like any loop, so real I/O is never cut short by a jump. Time spent computing counts
in real time too. The one thing it cannot see is a thread of the handler's own that wakes
the loop with `call_soon_threadsafe`; such a handler may see a timer fire early.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
import time
from collections.abc import Callable
from typing import Any, TypeVar, TypeVarTuple

__all__ = ["VirtualTimeLoop"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class _SkippingSelector(selectors.DefaultSelector):
    """Asks the loop whether a wait may be skipped before it sleeps."""

    loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self.loop
        # None: no timer at all, so nothing to jump to; 0: work is ready already.
        if loop is None or timeout is None or timeout <= 0 or not loop.idle():
            return super().select(timeout)
        ready = super().select(0)
        if not ready:
            loop.skip(timeout)
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop on a clock that jumps over idle waits (see the module).

    Args:
        on_skip: called with the seconds skipped, each time the loop jumps.
    """

    def __init__(self, on_skip: Callable[[float], None] | None = None) -> None:
        self._skipped = 0.0
        self._jobs = 0
        self._on_skip = on_skip
        selector = _SkippingSelector()
        super().__init__(selector)
        # What is watched now is the loop's own wake-up pipe; anything more is real I/O.
        self._own_fds = frozenset(selector.get_map())
        self._watched = selector.get_map()
        selector.loop = self

    def time(self) -> float:
        return time.monotonic() + self._skipped

    @property
    def skipped(self) -> float:
        """Seconds jumped over so far."""
        return self._skipped

    def idle(self) -> bool:
        """Whether only a timer can wake the loop now."""
        return self._jobs == 0 and self._watched.keys() <= self._own_fds

    def skip(self, seconds: float) -> None:
        """Move the clock forward by `seconds` (called by the selector instead of sleeping)."""
        self._skipped += seconds
        if self._on_skip is not None:
            self._on_skip(seconds)

    def run_in_executor(
        self,
        executor: concurrent.futures.Executor | None,
        func: Callable[[*Ts], T],
        *args: *Ts,
    ) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self._jobs += 1
        # Runs on the loop once the result is in: the job stays counted until the loop has
        # seen its result, so a jump can never come between the two.
        future.add_done_callback(self._job_done)
        return future

    def _job_done(self, _future: asyncio.Future[Any]) -> None:
        self._jobs -= 1
