"""The in-memory broker's deliveries: the runner's `Consumer`, driven one message at a time.

Each subscribed listener gets a real `listener.runner.consumer.Consumer` on the
`MemoryTransport`, so decoding, attempt counting, the outcome, the copy's headers, the delay
tier, the middleware hooks and the acks are a worker's own code. What stays here is what
only a test needs:

* how `handle()` is called: under `join()` a sync handler runs on the calling thread (as if
  no event loop ran there, like a worker's handler thread), under `ajoin()` on a thread of
  its own; either way it is never abandoned: one that outlives its `timeout` runs to its
  end, then counts as timed out;
* the exception `handle()` raised, for `fail_fast` to re-raise once the message is settled;
* SystemExit or KeyboardInterrupt from `handle()`: the message goes back to the head of the
  queues (as the broker would requeue it) and `join()` raises;
* idempotent listeners without the broker's database, or async ones on SQLite under
  `join()`'s virtual clock, which fail their attempts with a TypeError that says what to do;
* what `MemoryBroker.handled()` and the counts record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from listener._memory_broker import Envelope, Store
from listener._memory_transport import MemoryTransport
from listener.errors import Reject, Retry
from listener.middleware import Chain, Delivery, Middleware
from listener.runner.consumer import Consumer, HandlerCall
from listener.runner.execution import (
    AttemptTimedOut,
    HandlerExited,
    check_sync_result,
    run_async,
)

if TYPE_CHECKING:
    from listener.inbox import Inbox
    from listener.listener import Listener
    from listener.outcome import Failure
    from listener.settings import Settings

__all__ = ["Deliveries"]


class Deliveries:
    """Runs deliveries taken from a `Store` through each listener's `Consumer`."""

    def __init__(self, store: Store, middleware: Sequence[Middleware], settings: Settings) -> None:
        self.store = store
        self.transport = MemoryTransport(store)
        # Last, so that its after-hooks run first: a message counts as handled before the
        # user's middleware hears of it, as it did when the kit recorded it itself.
        self.chain = Chain([*middleware, _Recorder(store)])
        self.settings = settings
        self.consumers: dict[type[Listener], Consumer] = {}
        #: The exception `handle()` raised in the current delivery (not Retry or Reject).
        self._error: Exception | None = None
        #: SystemExit or KeyboardInterrupt, raised by `handle()` in the current delivery.
        self._exited: BaseException | None = None
        self._inline = False

    @property
    def inboxes(self) -> list[Inbox]:
        """The inboxes of idempotent listeners (with the broker's database only)."""
        return [c.inbox for c in self.consumers.values() if c.inbox is not None]

    def add(self, cls: type[Listener]) -> None:
        """Start `cls`'s consumer, once (its instance is created now, as a worker does)."""
        if cls in self.consumers:
            return
        consumer = Consumer(
            cls,
            self.transport,
            settings=self.settings,
            on_fatal=lambda _reason: None,  # join() raises instead (see deliver)
            chain=self.chain,
            call=self._caller(cls),
            inbox=self.settings.database_url is not None,
            clock=lambda: self.store.clock.datetime,
        )
        self.consumers[cls] = consumer
        self.transport.subscribe(cls.queue, consumer.on_message)

    async def deliver(
        self, cls: type[Listener], envelope: Envelope, *, inline: bool
    ) -> Exception | None:
        """One delivery, run to its outcome; `inline`: sync handlers on this thread.

        Returns the exception `handle()` raised, if it failed with one.

        Raises:
            RuntimeError: `handle()` raised SystemExit or KeyboardInterrupt.
        """
        self._error, self._exited, self._inline = None, None, inline
        consumer = self.consumers[cls]
        message = self.transport.deliver(cls, envelope)
        running = set(consumer.in_flight)
        try:
            await asyncio.wait(running)
        except asyncio.CancelledError:
            # The test is being cancelled: the consumer hands the message back, as a
            # stopping worker does.
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise
        exited = self._exited
        if exited is not None:
            if not message.processed:
                message.nack(requeue=True)  # the broker would put it back: at the head
            raise RuntimeError(
                f"{cls.__name__}.handle raised {type(exited).__name__}: a worker would stop "
                "here; the message is back at the head of the MemoryBroker's queue"
            ) from exited
        return self._error

    # -- calling handle() -----------------------------------------------------------------

    def _caller(self, cls: type[Listener]) -> HandlerCall:
        async def call(handle: Callable[[Any], Any], message: Any, timeout: float) -> None:
            try:
                self._check(cls)
                if cls.is_async:
                    await run_async(handle, message, timeout)
                elif self._inline:
                    _without_loop(_timed, handle, message, timeout)
                else:
                    await asyncio.to_thread(_timed, handle, message, timeout)
            except HandlerExited as exc:
                self._exited = exc.original
                raise
            except AttemptTimedOut:
                raise
            except Exception as exc:
                # Retry and Reject steer the outcome; they are not failures to re-raise.
                if not isinstance(exc, Retry | Reject):
                    self._error = exc
                raise

        return call

    def _check(self, cls: type[Listener]) -> None:
        if not cls.idempotent:
            return
        inbox = self.consumers[cls].inbox
        if inbox is None:
            raise TypeError(
                f"{cls.__name__} is idempotent: its handle() needs a database session. Give "
                "the broker the database: MemoryBroker(..., database_url=...)"
            )
        if cls.is_async and inbox.on_sqlite and self._inline:
            # aiosqlite waits on a thread of its own, which the virtual clock cannot
            # see: it would jump to the time-out while the database works.
            raise TypeError(
                f"{cls.__name__} is an async idempotent listener on SQLite: deliver with "
                "`await broker.ajoin()`, whose clock is real, not with join()"
            )


class _Recorder(Middleware):
    """Records what `MemoryBroker.handled()` and its counts report."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def after_handle(
        self, delivery: Delivery, *, outcome: str, failure: Failure | None, duration: float
    ) -> None:
        store = self.store
        with store.lock:
            if outcome == "handled":
                store.handled[delivery.listener].append(delivery.message)
            if outcome in store.counts:
                store.counts[outcome] += 1


def _timed(handle: Callable[[Any], Any], message: Any, timeout: float) -> None:
    """Call a sync `handle()` to its end; past `timeout` the attempt counts as timed out
    (the runner would have given up on it at the deadline and dropped its result)."""
    started = time.monotonic()
    try:
        check_sync_result(handle(message))
    except (SystemExit, KeyboardInterrupt) as exc:
        raise HandlerExited(exc) from exc
    except Exception:
        if time.monotonic() - started <= timeout:
            raise
    elapsed = time.monotonic() - started
    if elapsed > timeout:
        raise AttemptTimedOut(
            f"handle() ran {elapsed:.3g}s, longer than its {timeout:g}s timeout"
        ) from None


def _without_loop(fn: Callable[..., None], *args: Any) -> None:
    """Run `fn` on this thread as if no event loop ran here: a sync handler under `join()`
    must be free to call `asyncio.run()`, as it is on a worker's handler thread."""
    loop = asyncio.get_running_loop()
    asyncio._set_running_loop(None)
    try:
        fn(*args)
    finally:
        asyncio._set_running_loop(loop)
