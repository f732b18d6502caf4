"""Running `handle()`: async handlers on the loop, sync handlers on threads, both timed.

An async handler that outlives its timeout is cancelled. A sync handler cannot be stopped
from outside (Python has no safe way to kill a thread), so when it outlives its timeout the
attempt counts as failed at once and its thread is *abandoned*: it runs on until `handle`
returns, and its result is thrown away.

Sync attempts run on a pool that never waits for a thread: when no thread is idle, a new one
starts, so an abandoned thread never holds up the next message (prefetch already bounds how
many attempts run at once). A bounded pool was rejected: abandoned threads would use up its
slots and wedge the listener. Idle threads end after a minute. Threads are daemons: they
never keep the process from exiting, and `stuck` counts the abandoned ones still running so
that a supervisor can recycle the worker. Results come back to the loop in batches, with
one wake-up for however many finished meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import inspect
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = [
    "AttemptTimedOut",
    "HandlerExited",
    "HandlerThreads",
    "check_sync_result",
    "run_async",
    "run_sync",
]

#: How long an idle pool thread waits for work before it ends.
_IDLE_SECONDS = 60.0


class AttemptTimedOut(Exception):
    """The attempt ran longer than the listener's `timeout`."""


class HandlerExited(Exception):
    """The handler raised SystemExit or KeyboardInterrupt: the worker must stop.

    Carried as an ordinary exception because asyncio lets those two escape the event loop.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"handle() raised {type(original).__name__}{original.args!r}")
        self.original = original


class HandlerThreads:
    """A pool of daemon threads for sync attempts that counts the ones left running."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[_Attempt | None] = queue.SimpleQueue()
        self._idle = 0
        self._started = 0
        self.stuck = 0
        self._results: collections.deque[_Attempt] = collections.deque()
        self._wake_pending = False

    def __repr__(self) -> str:
        return (
            f"<HandlerThreads {self._name} started={self._started} idle={self._idle} "
            f"stuck={self.stuck}>"
        )

    async def run(self, fn: Callable[[Any], Any], arg: Any, timeout: float) -> Any:
        """Run `fn(arg)` on a pool thread and wait up to `timeout` seconds for it.

        Raises:
            AttemptTimedOut: past the timeout; the thread is abandoned.
            HandlerExited: `fn` raised SystemExit or KeyboardInterrupt.
            asyncio.CancelledError: the wait was cancelled; the thread is abandoned.
        """
        loop = asyncio.get_running_loop()
        # The handler sees the context of the attempt (what middleware set, a trace span).
        attempt = _Attempt(fn, arg, loop, contextvars.copy_context())
        self._submit(attempt)
        try:
            async with asyncio.timeout(timeout) as deadline:
                return await attempt.future
        except TimeoutError:
            if deadline.expired():
                self._abandon(attempt)
                raise AttemptTimedOut(
                    f"handle() ran longer than its {timeout:g}s timeout; its thread was abandoned"
                ) from None
            raise
        except asyncio.CancelledError:
            self._abandon(attempt)
            raise

    def _submit(self, attempt: _Attempt) -> None:
        with self._lock:
            spawn = self._idle == 0
            if spawn:
                self._started += 1
                number = self._started
            else:
                self._idle -= 1  # that thread is spoken for
        self._work.put(attempt)
        if spawn:
            threading.Thread(target=self._serve, name=f"{self._name}-{number}", daemon=True).start()

    def _abandon(self, attempt: _Attempt) -> None:
        with self._lock:
            if not attempt.finished:
                attempt.abandoned = True
                self.stuck += 1

    def _serve(self) -> None:
        while True:
            try:
                attempt = self._work.get(timeout=_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # not spoken for meanwhile: this thread may end
                        self._idle -= 1
                        return
                continue
            if attempt is None:
                return
            attempt.context.run(self._call, attempt)
            with self._lock:
                attempt.finished = True
                self._idle += 1
                if attempt.abandoned:
                    self.stuck -= 1
                    continue  # nobody waits for this result any more
            self._results.append(attempt)
            if not self._wake_pending:
                self._wake_pending = True
                # A closed loop means the worker is exiting: nobody waits for the result.
                with contextlib.suppress(RuntimeError):
                    attempt.loop.call_soon_threadsafe(self._deliver_results)

    @staticmethod
    def _call(attempt: _Attempt) -> None:
        try:
            result = attempt.fn(attempt.arg)
            check_sync_result(result)
            attempt.result = result
        except (SystemExit, KeyboardInterrupt) as exc:
            attempt.error = HandlerExited(exc)
        except BaseException as exc:
            attempt.error = exc

    def _deliver_results(self) -> None:
        self._wake_pending = False
        results = self._results
        while results:
            attempt = results.popleft()
            future = attempt.future
            if future.done():  # cancelled or timed out meanwhile: nobody waits for it
                continue
            if attempt.error is not None:
                future.set_exception(attempt.error)
            else:
                future.set_result(attempt.result)


class _Attempt:
    __slots__ = (
        "abandoned",
        "arg",
        "context",
        "error",
        "finished",
        "fn",
        "future",
        "loop",
        "result",
    )

    def __init__(
        self,
        fn: Callable[[Any], Any],
        arg: Any,
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
    ) -> None:
        self.fn = fn
        self.arg = arg
        self.loop = loop
        self.context = context
        self.future: asyncio.Future[Any] = loop.create_future()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.finished = False


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
    """Run a sync handler on its own thread; past `timeout` abandon it and fail the attempt."""
    await threads.run(handler, message, timeout)


def check_sync_result(result: Any) -> None:
    """Refuse an awaitable returned by a sync `handle()` (an async handler in disguise).

    Nothing would ever run it, so the attempt must not count as done.

    Raises:
        TypeError: `result` is awaitable (it is closed first).
    """
    if not inspect.isawaitable(result):
        return
    close = getattr(result, "close", None)
    if close is not None:
        # Closing is a courtesy; the TypeError below is what matters.
        with contextlib.suppress(Exception):
            close()
    raise TypeError(
        "handle() returned an awaitable: it is async but does not look it (a "
        "decorator without functools.wraps?); declare it with async def"
    )
