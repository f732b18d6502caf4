"""Running `handle()`: async handlers on the loop, sync handlers on threads, both timed.

An async handler that outlives its timeout is cancelled. A sync handler cannot be stopped
from outside (Python has no safe way to kill a thread), so when it outlives its timeout the
attempt counts as failed at once, its thread is *abandoned* (it runs on until `handle`
returns, and its result is thrown away) and a new thread takes its place, so the listener
keeps its full concurrency. Abandoned threads are daemon threads: they never keep the
process from exiting, and `stuck` counts them for the supervisor to recycle the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["AttemptTimedOut", "HandlerExited", "HandlerThreads", "run_async", "run_sync"]


class AttemptTimedOut(Exception):
    """The attempt ran longer than the listener's `timeout`."""


class HandlerExited(Exception):
    """The handler raised SystemExit or KeyboardInterrupt: the worker must stop.

    Carried as an ordinary exception because asyncio lets those two escape the event loop.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"handle() raised {type(original).__name__}{original.args!r}")
        self.original = original


_Job = tuple[Callable[[Any], Any], Any, "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class HandlerThreads:
    """A pool of daemon threads for synchronous handlers that replaces stuck threads."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._retiring = 0  # abandoned threads that should exit once their handler returns
        self.stuck = 0

    def __repr__(self) -> str:
        return f"<HandlerThreads {self._name} threads={self._threads} stuck={self.stuck}>"

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> asyncio.Future[Any]:
        """Run `fn(arg)` on a pool thread; the returned future resolves on the loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            spawn = self._idle == 0 and self._threads - self.stuck < self._size
            if spawn:
                self._threads += 1
            else:
                self._idle -= 1 if self._idle else 0
        if spawn:
            threading.Thread(
                target=self._work, name=f"{self._name}-{self._threads}", daemon=True
            ).start()
        self._jobs.put((fn, arg, future, loop))
        return future

    def abandon(self) -> None:
        """Count one thread as stuck and let a fresh one take its place."""
        with self._lock:
            self.stuck += 1
            self._retiring += 1

    def shutdown(self) -> None:
        """Let idle threads exit; busy (or stuck) ones exit when their handler returns."""
        with self._lock:
            count = self._threads
        for _ in range(count):
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, arg, future, loop = job
            try:
                result = fn(arg)
            except (SystemExit, KeyboardInterrupt) as exc:
                _resolve(loop, future, None, HandlerExited(exc))
            except BaseException as exc:
                _resolve(loop, future, None, exc)
            else:
                _resolve(loop, future, result, None)
            with self._lock:
                if future.cancelled() and self._retiring:
                    # This thread was abandoned and a replacement already runs: leave.
                    self._retiring -= 1
                    self.stuck -= 1
                    self._threads -= 1
                    return
                self._idle += 1


def _resolve(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    exc: BaseException | None,
) -> None:
    def settle() -> None:
        if future.done():  # cancelled by a time-out: nobody waits for this result
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    # A closed loop means the worker is exiting: nobody waits for the result.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)


async def run_async(handler: Callable[[Any], Awaitable[Any]], message: Any, timeout: float) -> None:
    """Await an async handler, cancelling it after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout) as deadline:
            await handler(message)
    except TimeoutError:
        if deadline.expired():
            raise AttemptTimedOut(f"handle() ran longer than its {timeout:g}s timeout") from None
        raise  # the handler's own TimeoutError is an ordinary failure
    except (SystemExit, KeyboardInterrupt) as exc:
        raise HandlerExited(exc) from exc


async def run_sync(
    threads: HandlerThreads, handler: Callable[[Any], Any], message: Any, timeout: float
) -> None:
    """Run a sync handler on `threads`; past `timeout` abandon its thread and fail the attempt."""
    future = threads.submit(handler, message)
    try:
        async with asyncio.timeout(timeout) as deadline:
            await future
    except TimeoutError:
        if deadline.expired():
            threads.abandon()
            raise AttemptTimedOut(
                f"handle() ran longer than its {timeout:g}s timeout; its thread was abandoned"
            ) from None
        raise
