"""Test your listeners without RabbitMQ: an in-memory broker with the runner's outcomes.

While a `MemoryBroker` is active (`with broker:`), `notify()`, `anotify()`,
`notify_many()`, `anotify_many()`, `listener.publish()` and `listener.apublish()` publish
to it instead of RabbitMQ. `join()` then delivers every message to the listeners subscribed
to it, and settles each one with the runner's own code (a worker's `Consumer`, over an
in-memory transport): the same attempt counting, retry delays (on a virtual clock: nothing
sleeps), parking reasons and failure headers.

    from listener.testing import MemoryBroker

    def test_copies_the_file(tmp_path):
        with MemoryBroker(FileCopier) as broker:
            FileCopier.notify(case_id=7, src=..., dst=...)
            broker.join()               # re-raises the first exception a handler raised
        assert [m.case_id for m in broker.handled(FileCopier)] == [7]

With pytest, the `memory_broker` fixture (from this package's pytest plugin) is an active
broker with nothing subscribed: `memory_broker.subscribe(FileCopier)`.

With `MemoryBroker(..., database_url=...)`, `join()` first relays what committed to the
outbox (`notify(..., session=)`) into the broker, and again as handlers commit more, so a test
commits and then joins; idempotent listeners get their session and inbox on that database
(an async one on SQLite: deliver with `ajoin()`).

What it does not model: connections, confirms and their failures, worker processes and their
deaths, prefetch and concurrency (deliveries run one at a time, in order), signals, queue
arguments and limits, broker-written headers (`x-death`, `x-delivery-count`), and the
abandoning of a sync handler's thread at its time-out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from listener import _redirect, codec, routing
from listener import schedule as _schedule
from listener._memory_broker import Clock, Envelope, ParkedMessage, PublishedMessage, Store
from listener._memory_delivery import Deliveries
from listener._memory_publishers import memory_async_publisher, memory_publisher, run_now
from listener._memory_schedules import advance_with_ticks
from listener._virtual_loop import VirtualTimeLoop
from listener.middleware import Middleware, installed_middleware
from listener.settings import get_settings

if TYPE_CHECKING:
    import sqlalchemy as sa

    from listener.apublisher import AsyncPublisher
    from listener.listener import Listener
    from listener.publisher import Publisher

__all__ = ["Clock", "MemoryBroker", "ParkedMessage", "PublishedMessage"]

T = TypeVar("T")

# Documented and imported from here.
for _record in (Clock, ParkedMessage, PublishedMessage):
    _record.__module__ = __name__


class MemoryBroker:
    """An in-memory RabbitMQ for unit tests: topic routing, retries and parking as the runner
    does them, on a virtual clock.

    Args:
        *listeners: listener classes to subscribe (more with `subscribe()`).
        fail_fast: the default of `join(fail_fast=...)`: re-raise the first exception a
            handler raises, after its message was settled (retried or parked).
        middleware: the middleware whose hooks fire around each delivery; default: the
            installed middleware (`listener.add_middleware`), as a worker would run.
        database_url: the database of the outbox and the inbox. `join()` then relays what
            committed to the outbox first (and what handlers commit to it as they run), and
            idempotent listeners get their session and inbox on it.
        start: the wall-clock time (aware) the virtual clock starts at; default: now.
        schedule_timezone: the zone cron schedules are read in; default: the setting's.

    Use it as a context manager (`with` or `async with`); one broker is active at a time.
    """

    #: `join()` stops with an error after this many deliveries: handlers that keep notifying
    #: each other would otherwise never let the queues empty.
    max_deliveries = 100_000

    def __init__(
        self,
        *listeners: type[Listener],
        fail_fast: bool = True,
        middleware: Sequence[Middleware] | None = None,
        database_url: str | None = None,
        start: dt.datetime | None = None,
        schedule_timezone: str | None = None,
    ) -> None:
        self.fail_fast = fail_fast
        self._store = Store()
        if start is not None:
            self._store.clock._epoch = start.astimezone(dt.UTC)
        self._schedule_timezone = schedule_timezone
        settings = get_settings()
        self._outbox: sa.Engine | None = None
        if database_url is not None:
            from listener.database import create_engine

            self._outbox = create_engine(database_url)
            settings = settings.with_database_url(database_url)
        self._deliveries = Deliveries(
            self._store,
            installed_middleware() if middleware is None else middleware,
            settings,
        )
        self._publisher = memory_publisher(self._store)
        self._async_publisher = memory_async_publisher(self._store)
        self._loop: VirtualTimeLoop | None = None
        self._joining = False
        self.subscribe(*listeners)

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self._store.counts.items())
        return (
            f"<MemoryBroker listeners={len(self._store.listeners)} "
            f"published={len(self._store.published)} {counts} pending={self.pending()} "
            f"clock={self.clock.now:g}s{' active' if self.active else ''}>"
        )

    # -- set-up -----------------------------------------------------------------------------

    def subscribe(self, *listeners: type[Listener]) -> None:
        """Declare these listeners' queues and bindings, and deliver to them in `join()`."""
        from listener.listener import Listener

        for cls in listeners:
            if not (isinstance(cls, type) and issubclass(cls, Listener)):
                raise TypeError(f"subscribe() takes Listener subclasses, got {cls!r}")
            if cls.__abstract__:
                raise TypeError(f"{cls.__name__} is abstract: subscribe its concrete subclasses")
            self._store.add_listener(cls)
            self._deliveries.add(cls)

    def bind(self, address: str) -> None:
        """Make `"exchange.pattern"` routable without a listener behind it: for messages your
        code publishes to other services. They show up in `published`, and are never handled.
        """
        self._store.add_sink(routing.parse_address(address))

    def __enter__(self) -> MemoryBroker:
        if _redirect.active is not None:
            raise RuntimeError(
                f"another MemoryBroker is active ({_redirect.active!r}): one test uses one at "
                "a time (the memory_broker fixture is one already)"
            )
        _redirect.active = self
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> MemoryBroker:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._close_inboxes()
        self.close()

    async def _close_inboxes(self) -> None:
        for inbox in self._deliveries.inboxes:
            await inbox.aclose()

    def close(self) -> None:
        """Stop taking publishes (they go to RabbitMQ again). What was recorded stays readable."""
        if _redirect.active is self:
            _redirect.active = None
        if self._outbox is not None:
            self._outbox.dispose()
        loop, self._loop = self._loop, None
        if self._deliveries.inboxes and not _loop_running():  # else __aexit__ closed them
            closing = self._close_inboxes()
            if loop is not None and not loop.is_closed():
                loop.run_until_complete(closing)  # where their connections were opened
            else:
                asyncio.run(closing)
        if loop is not None and not loop.is_closed():
            if not _loop_running():
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    @property
    def active(self) -> bool:
        """Whether publishes go to this broker now."""
        return _redirect.active is self

    # -- publishing -------------------------------------------------------------------------

    def publish_raw(
        self,
        address: str,
        body: bytes,
        *,
        content_type: str | None = codec.CONTENT_TYPE,
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> str:
        """Publish bytes as any AMQP client could (no validation): for bodies that are not
        JSON, other content types, hand-made headers. Returns the message id.

        Raises:
            Unroutable: no queue is bound for the address.
        """
        exchange, key = routing.parse_address(address, wildcards=False)
        codec.check_size(body, self._publisher.settings.max_body_bytes)
        return self._store.publish(
            exchange,
            key,
            body,
            headers=headers,
            message_id=message_id,
            content_type=content_type,
            content_encoding=content_encoding,
        )

    # -- running ----------------------------------------------------------------------------

    def join(self, fail_fast: bool | None = None, *, wait_for_retries: bool = True) -> None:
        """Deliver until every queue, delay queues included, is empty.

        Sync handlers run on this thread; async handlers on a private event loop that skips
        idle waits on the virtual clock (`listener._virtual_loop` says when it may). Waiting
        for a retry moves the virtual clock to it, without sleeping. Messages handlers
        publish are delivered in the same call.

        Args:
            fail_fast: re-raise the first exception a handler raised, once its message
                was settled (default: the broker's). `Retry` and `Reject` are outcomes,
                not failures; so are time-outs and bodies that cannot be decoded (see
                `parked()`).
            wait_for_retries: False delivers only what is ready now; retries wait until
                `advance()` brings their time.

        Raises:
            RuntimeError: an event loop runs in this thread (use `await ajoin()`), the broker
                is not active, or `join()` is running already.
        """
        if _loop_running():
            raise RuntimeError(
                "MemoryBroker.join() blocks, and an event loop is running in this thread: "
                "use `await broker.ajoin()` in async code"
            )
        fail_fast = self.fail_fast if fail_fast is None else fail_fast
        with self._joined():
            loop = self._private_loop()
            for _ in range(self.max_deliveries):
                taken = self._take(wait_for_retries)
                if taken is None:
                    return
                # Each delivery is a task of its own, with a copy of this thread's context.
                error = loop.run_until_complete(self._deliveries.deliver(*taken, inline=True))
                if error is not None and fail_fast:
                    raise error
            raise self._runaway()

    async def ajoin(self, fail_fast: bool | None = None, *, wait_for_retries: bool = True) -> None:
        """The asyncio twin of `join()`: async handlers run on the running loop, with their
        `timeout` in real time (this loop's clock cannot be skipped); sync handlers each on a
        thread, as in a worker."""
        fail_fast = self.fail_fast if fail_fast is None else fail_fast
        with self._joined():
            for _ in range(self.max_deliveries):
                taken = self._take(wait_for_retries)
                if taken is None:
                    return
                error = await self._deliveries.deliver(*taken, inline=False)
                if error is not None and fail_fast:
                    raise error
            raise self._runaway()

    def advance(self, seconds: float) -> None:
        """Move the virtual clock forward. Retries that come due go back to their queues, to be
        delivered by the next `join()`; each tick of a scheduled listener's schedule that falls
        in the time moved over is published, as the elected scheduler would."""
        if not seconds >= 0:
            raise ValueError(f"advance() takes a number of seconds >= 0, got {seconds!r}")
        zone = self._schedule_timezone or self._publisher.settings.schedule_timezone
        advance_with_ticks(self._store, _schedule.time_zone(zone), seconds)

    # -- what happened ----------------------------------------------------------------------

    @property
    def clock(self) -> Clock:
        """The virtual clock: `clock.now` seconds since the broker was created."""
        return self._store.clock

    @property
    def published(self) -> list[PublishedMessage]:
        """Every message published while the broker was active, in order, handlers' too."""
        with self._store.lock:
            return list(self._store.published)

    def handled(self, listener: type[Listener]) -> list[Any]:
        """The messages `listener.handle()` returned for, decoded (model instances), in order."""
        self._check_subscribed(listener)
        with self._store.lock:
            return list(self._store.handled[listener])

    def parked(self, listener: type[Listener]) -> list[ParkedMessage]:
        """The messages parked in `listener`'s dead-letter queue, in order."""
        self._check_subscribed(listener)
        with self._store.lock:
            return list(self._store.parked[listener])

    def pending(self, listener: type[Listener] | None = None) -> int:
        """Messages ready or waiting for a retry, of `listener` or of all."""
        if listener is not None:
            self._check_subscribed(listener)
        return self._store.pending(listener)

    # -- what the default publishers consult (listener._redirect) ---------------------------

    @property
    def publisher(self) -> Publisher:
        """The `Publisher` behind `notify()` and `listener.publish()` while active."""
        return self._publisher

    @property
    def async_publisher(self) -> AsyncPublisher:
        """The `AsyncPublisher` behind `anotify()` and `listener.apublish()` while active."""
        return self._async_publisher

    def run_batch(self, work: Callable[[AsyncPublisher], Awaitable[T]]) -> T:
        """Run a `notify_many()` batch against this broker."""
        return run_now(work, self._async_publisher)

    # -- internals --------------------------------------------------------------------------

    def _joined(self) -> _Joining:
        if not self.active:
            raise RuntimeError(
                "this MemoryBroker is not active, so handlers would publish to RabbitMQ: "
                "use it as `with broker:` (or the memory_broker fixture)"
            )
        return _Joining(self)

    def _take(self, wait_for_retries: bool) -> tuple[type[Listener], Envelope] | None:
        """The next delivery, after relaying what committed to the outbox meanwhile."""
        if self._outbox is not None:
            from listener._memory_outbox import flush  # the database is an optional extra

            flush(self._outbox, self._store)
        return self._store.take(wait_for_retries=wait_for_retries)

    def _private_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = VirtualTimeLoop(on_skip=self._store.advance)
        return self._loop

    def _check_subscribed(self, listener: type[Listener]) -> None:
        if listener not in self._store.handled:
            name = getattr(listener, "__name__", repr(listener))
            raise ValueError(
                f"{name} is not subscribed to this MemoryBroker: pass it to "
                f"MemoryBroker(..., {name}) or call broker.subscribe({name})"
            )

    def _runaway(self) -> RuntimeError:
        return RuntimeError(
            f"join() made {self.max_deliveries} deliveries and the queues are still not empty: "
            "do handlers notify each other in a loop? (raise MemoryBroker.max_deliveries "
            "for a larger test)"
        )


class _Joining:
    """Marks a broker as joining, refusing a second join (from a handler, say)."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    def __enter__(self) -> None:
        if self._broker._joining:
            raise RuntimeError(
                "join() or ajoin() is running already (called from a handler?); messages "
                "a handler publishes are delivered by the join() running it"
            )
        self._broker._joining = True

    def __exit__(self, *exc_info: object) -> None:
        self._broker._joining = False


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
