"""Asynchronous, confirmed publishing: `anotify()`, `apublish()` and batches.

The publisher validates and builds each message (`listener._outgoing`); its backend sends
it (on aio-pika's connection, `listener._aiormq_backend`). Each event loop gets its own
connection. A batch sends every message before waiting, so
the confirms are pipelined: the batch costs about one round trip, not one per message.
The synchronous `notify_many()` runs a batch on a private event loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from listener import _outgoing, _redirect, codec, routing
from listener import delay as _delay
from listener._aiormq_backend import AiormqBackend
from listener._loop import loop_factory
from listener._outgoing import Outgoing, Sending
from listener.errors import PublishNacked
from listener.settings import Settings, get_settings

__all__ = [
    "AsyncBackend",
    "AsyncPublisher",
    "apublish",
    "default_async_publisher",
    "run_in_background",
]

T = TypeVar("T")

#: The most messages of a batch awaiting their confirms at once.
_WINDOW = 1000


class AsyncBackend(Protocol):
    """What sends for an AsyncPublisher: aiormq (`listener._aiormq_backend`) or, in tests,
    the memory broker (`listener._memory_publishers`)."""

    def describe(self) -> str:
        """A few words for the publisher's repr."""
        ...

    async def send(self, exchange: str, routing_key: str, message: Outgoing) -> None:
        """Send one message and wait for its confirm; raises a PublishError."""
        ...

    async def send_batch(self, batch: Sequence[Sending]) -> Sequence[Exception | None]:
        """Send every message, then wait for their confirms; each one's error or None."""
        ...

    async def reopen(self) -> None:
        """Use a new channel from the next send on (after a nack)."""
        ...

    async def aclose(self) -> None:
        """Close the connection, if any."""
        ...


class AsyncPublisher:
    """Publishes with confirms on one asyncio event loop.

    Example:
        publisher = AsyncPublisher()
        await publisher.publish("case_files.copy_requested", {"case_id": 1})
        await publisher.aclose()
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._backend: AsyncBackend = AiormqBackend(self.settings)
        self._published = 0

    @classmethod
    def _sending_to(cls, backend: AsyncBackend, settings: Settings | None = None) -> AsyncPublisher:
        """A publisher whose messages go to `backend` (the memory broker's, in tests)."""
        publisher = cls(settings)
        publisher._backend = backend
        return publisher

    def __repr__(self) -> str:
        return f"<AsyncPublisher {self._backend.describe()} published={self._published}>"

    async def publish(
        self,
        address: str,
        value: Any,
        *,
        headers: dict[str, Any] | None = None,
        delay: float | dt.timedelta | None = None,
        at: dt.datetime | None = None,
    ) -> str:
        """Publish `value` as JSON to `"exchange.routing_key"`; returns the message id once
        confirmed. With `delay=` seconds or `at=` an aware datetime, it reaches every
        listener bound there at that moment (see `listener.delay`)."""
        exchange, key = routing.parse_address(address, wildcards=False)
        seconds = _delay.seconds_until(delay=delay, at=at)
        exchange, key, headers = _delay.address_route(exchange, key, headers, seconds)
        return await self.publish_body(exchange, key, codec.encode(value), headers=headers)

    async def publish_body(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """Publish an encoded body and wait for its confirm."""
        codec.check_size(body, self.settings.max_body_bytes)
        message = _outgoing.new(body, headers)
        try:
            await self._backend.send(exchange, routing_key, message)
        except PublishNacked:
            await self._backend.reopen()
            raise
        self._published += 1
        return message.message_id

    async def publish_bodies(
        self,
        exchange: str,
        routing_key: str,
        bodies: Sequence[bytes],
        *,
        headers: dict[str, Any] | None = None,
    ) -> list[str]:
        """Publish a batch with pipelined confirms, each with `headers`; returns the ids in
        order.

        Raises:
            PublishError: the first failure, once every confirm is in (the others that were
                confirmed stay published).
        """
        for body in bodies:  # all or nothing: refuse the batch before the first send
            codec.check_size(body, self.settings.max_body_bytes)
        ids: list[str] = []
        first_error: Exception | None = None
        new = _outgoing.new
        # In windows, so that a huge batch does not hold every unconfirmed message at once.
        for start in range(0, len(bodies), _WINDOW):
            window = [
                (exchange, routing_key, new(body, headers), None)
                for body in bodies[start : start + _WINDOW]
            ]
            ids += [message.message_id for _, _, message, _ in window]
            errors = await self._backend.send_batch(window)
            for error in errors:
                if error is None:
                    self._published += 1
                elif first_error is None:
                    first_error = error
        if first_error is not None:
            if isinstance(first_error, PublishNacked):
                await self._backend.reopen()
            raise first_error
        return ids

    async def aclose(self) -> None:
        """Close the connection; the publisher re-opens it if used again."""
        await self._backend.aclose()


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncPublisher] = (
    weakref.WeakKeyDictionary()
)


def default_async_publisher() -> AsyncPublisher:
    """The running event loop's publisher behind `anotify()` and `apublish()` (while a
    `listener.testing.MemoryBroker` is active, that broker's)."""
    redirect = _redirect.active
    if redirect is not None:
        return redirect.async_publisher
    loop = asyncio.get_running_loop()
    publisher = _per_loop.get(loop)
    if publisher is None:
        publisher = _per_loop[loop] = AsyncPublisher()
    return publisher


async def apublish(
    address: str,
    value: Any,
    *,
    headers: dict[str, Any] | None = None,
    session: Any = None,
    ordering_key: str | None = None,
    delay: float | dt.timedelta | None = None,
    at: dt.datetime | None = None,
) -> str:
    """The asyncio twin of `listener.publish()`; `session` is an `AsyncSession` (or a
    `Session`)."""
    if session is not None or ordering_key is not None:
        from listener import outbox

        exchange, key = routing.parse_address(address, wildcards=False)
        body = codec.encode(value)
        headers = _delay.due_headers(headers, delay=delay, at=at)
        ids = await outbox.awrite(
            session, exchange, key, [body], headers=headers, ordering_key=ordering_key
        )
        return ids[0]
    publisher = default_async_publisher()
    return await publisher.publish(address, value, headers=headers, delay=delay, at=at)


class _BackgroundLoop:
    """An event loop in a daemon thread, so synchronous code can run batches on it."""

    def __init__(self) -> None:
        self.loop = loop_factory(get_settings().event_loop)()
        self.publisher: AsyncPublisher | None = None
        thread = threading.Thread(
            target=self.loop.run_forever, name="amqp-listener-publisher", daemon=True
        )
        thread.start()


_background: _BackgroundLoop | None = None
_background_lock = threading.Lock()


def run_in_background(work: Callable[[AsyncPublisher], Awaitable[T]]) -> T:
    """Run `work(publisher)` on the background loop and wait for its result (thread-safe).

    While a `listener.testing.MemoryBroker` is active, `work` runs against that broker.
    """
    redirect = _redirect.active
    if redirect is not None:
        return redirect.run_batch(work)
    global _background
    with _background_lock:
        if _background is None:
            _background = _BackgroundLoop()
        background = _background

    async def call() -> T:
        if background.publisher is None:
            background.publisher = AsyncPublisher()
        return await work(background.publisher)

    return asyncio.run_coroutine_threadsafe(call(), background.loop).result()


def _forget_after_fork() -> None:
    global _background, _background_lock
    _background = None
    _background_lock = threading.Lock()
    _per_loop.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
