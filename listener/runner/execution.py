"""Running `handle()`: async handlers on the loop, sync handlers on threads, both timed.

An async handler that outlives its timeout is cancelled. A sync handler cannot be stopped
from outside (Python has no safe way to kill a thread), so when it outlives its timeout the
attempt counts as failed at once and its thread is *abandoned*: it runs on until `handle`
returns, and its result is thrown away. Each attempt gets a thread of its own (prefetch
already bounds how many run at once), so an abandoned thread never holds up the next
message. Abandoned threads are daemon threads: they never keep the process from exiting,
and `stuck` counts them so that a supervisor can recycle the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
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


class HandlerThreads:
    """Starts a daemon thread per sync attempt and counts the ones left running."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._started = 0
        self.stuck = 0

    def __repr__(self) -> str:
        return f"<HandlerThreads {self._name} started={self._started} stuck={self.stuck}>"

    async def run(self, fn: Callable[[Any], Any], arg: Any, timeout: float) -> Any:
        """Run `fn(arg)` on a new thread and wait up to `timeout` seconds for it.

        Raises:
            AttemptTimedOut: past the timeout; the thread is abandoned.
            HandlerExited: `fn` raised SystemExit or KeyboardInterrupt.
            asyncio.CancelledError: the wait was cancelled; the thread is abandoned.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        state = _Attempt()
        self._started += 1
        # The handler sees the context of the attempt (what middleware set, a trace span).
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run,
            args=(self._work, fn, arg, future, loop, state),
            name=f"{self._name}-{self._started}",
            daemon=True,
        )
        thread.start()
        try:
            async with asyncio.timeout(timeout) as deadline:
                return await future
        except TimeoutError:
            if deadline.expired():
                self._abandon(state)
                raise AttemptTimedOut(
                    f"handle() ran longer than its {timeout:g}s timeout; its thread was abandoned"
                ) from None
            raise
        except asyncio.CancelledError:
            self._abandon(state)
            raise

    def _abandon(self, state: _Attempt) -> None:
        with self._lock:
            if not state.finished:
                state.abandoned = True
                self.stuck += 1

    def _work(
        self,
        fn: Callable[[Any], Any],
        arg: Any,
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
        state: _Attempt,
    ) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn(arg)
            if inspect.isawaitable(result):
                # A coroutine returned by a handler that did not look async (a decorator
                # hid it): nothing would ever run it, so the attempt must not count as done.
                close = getattr(result, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()
                error = TypeError(
                    "handle() returned an awaitable: it is async but does not look it (a "
                    "decorator without functools.wraps?); declare it with async def"
                )
        except (SystemExit, KeyboardInterrupt) as exc:
            error = HandlerExited(exc)
        except BaseException as exc:
            error = exc
        with self._lock:
            state.finished = True
            if state.abandoned:
                self.stuck -= 1
                return  # nobody waits for this result any more
        _resolve(loop, future, result, error)


class _Attempt:
    __slots__ = ("abandoned", "finished")

    def __init__(self) -> None:
        self.abandoned = False
        self.finished = False


def _resolve(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    exc: BaseException | None,
) -> None:
    def settle() -> None:
        if future.done():  # cancelled or timed out meanwhile: nobody waits for it
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
    """Run a sync handler on its own thread; past `timeout` abandon it and fail the attempt."""
    await threads.run(handler, message, timeout)
