"""The publishers `notify()`, `anotify()` and `notify_many()` get while a MemoryBroker is
active: the real `Publisher` and `AsyncPublisher`, with a backend that puts each message in
the broker's `Store` instead of sending it.

The publishers check and build the message as in production (the address, the body size,
the id, the headers and trace context: `listener._outgoing`); only the sending differs, and
it never waits: there is no connection and no confirm. No method of these backends, nor of
the publishers over them, can reach RabbitMQ.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from listener._memory_broker import Store
from listener._outgoing import Outgoing, Sending
from listener.apublisher import AsyncPublisher
from listener.publisher import Publisher

__all__ = ["MemoryBackend", "memory_async_publisher", "memory_publisher", "run_now"]

T = TypeVar("T")


class MemoryBackend:
    """Sends into a MemoryBroker's `Store`, for the synchronous and the async publisher."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def describe(self) -> str:
        """For the publisher's repr."""
        return f"memory messages={len(self._store.published)}"

    def send(self, exchange: str, routing_key: str, message: Outgoing) -> None:
        """Route `message` as a mandatory publish (raises Unroutable as the broker would)."""
        self._store.publish(
            exchange,
            routing_key,
            message.body,
            headers=message.headers,
            message_id=message.message_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )

    def close(self) -> None:
        """Nothing to close: no connection was opened."""


class MemoryAsyncBackend:
    """The async side of `MemoryBackend`: nothing in it waits, so it works on any event
    loop, and without one (`run_now`)."""

    def __init__(self, store: Store) -> None:
        self._sync = MemoryBackend(store)

    def describe(self) -> str:
        """For the publisher's repr."""
        return self._sync.describe()

    async def send(self, exchange: str, routing_key: str, message: Outgoing) -> None:
        """Route `message` as a mandatory publish."""
        self._sync.send(exchange, routing_key, message)

    async def send_batch(self, batch: Sequence[Sending]) -> list[Exception | None]:
        """As the real batch: every message tried, each one's error (or None) returned."""
        errors: list[Exception | None] = []
        for exchange, routing_key, message, _named in batch:
            try:
                self._sync.send(exchange, routing_key, message)
            except Exception as exc:
                errors.append(exc)
            else:
                errors.append(None)
        return errors

    async def reopen(self) -> None:
        """No channel to reopen."""

    async def aclose(self) -> None:
        """Nothing to close: no connection was opened."""


def memory_publisher(store: Store) -> Publisher:
    """The `Publisher` that `notify()` and `listener.publish()` get while a broker is active."""
    return Publisher._sending_to(MemoryBackend(store))


def memory_async_publisher(store: Store) -> AsyncPublisher:
    """The `AsyncPublisher` that `anotify()` and `listener.apublish()` get while a broker is
    active."""
    return AsyncPublisher._sending_to(MemoryAsyncBackend(store))


def run_now(work: Callable[[AsyncPublisher], Awaitable[T]], publisher: AsyncPublisher) -> T:
    """Run `work(publisher)` to its end without an event loop (the memory publishers never
    wait), so that `notify_many()` works from any thread, a loop's included."""
    steps = work(publisher).__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    steps.close()
    raise RuntimeError(
        "a batch published to the MemoryBroker waited on something outside it; "
        "publish batches with notify_many()/anotify_many() only"
    )
