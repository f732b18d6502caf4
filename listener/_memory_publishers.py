"""The publishers `notify()`, `anotify()` and `notify_many()` get while a MemoryBroker is
active: subclasses of the real ones whose publish puts the message in the broker's `Store`.

They check what the real ones check before sending (the body size; `publish()` validates
the address and encodes as the real one does, being inherited), add the trace context, and
never wait: there is no connection and no confirm.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pika

from listener import codec
from listener._memory_broker import Store
from listener.apublisher import AsyncPublisher
from listener.publisher import Publisher
from listener.tracing import inject_trace_context

__all__ = ["MemoryAsyncPublisher", "MemoryPublisher", "run_now"]

T = TypeVar("T")


class MemoryPublisher(Publisher):
    """The `Publisher` that `notify()` and `listener.publish()` get while a broker is active."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store

    def __repr__(self) -> str:
        return f"<MemoryPublisher published={len(self._store.published)}>"

    def publish_body(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        properties: pika.BasicProperties | None = None,
    ) -> str:
        codec.check_size(body, self.settings.max_body_bytes)
        if properties is not None:
            return self._store.publish(
                exchange,
                routing_key,
                body,
                headers=dict(properties.headers or {}),
                message_id=properties.message_id,
                content_type=properties.content_type,
                content_encoding=properties.content_encoding,
            )
        headers = inject_trace_context(dict(headers) if headers else None)
        return self._store.publish(exchange, routing_key, body, headers=headers)

    def close(self) -> None:
        """Nothing to close: no connection was opened."""


class MemoryAsyncPublisher(AsyncPublisher):
    """The `AsyncPublisher` that `anotify()` and `listener.apublish()` get while a broker is
    active. Nothing in it waits, so it works on any event loop."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store

    def __repr__(self) -> str:
        return f"<MemoryAsyncPublisher published={len(self._store.published)}>"

    async def publish_body(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
    ) -> str:
        codec.check_size(body, self.settings.max_body_bytes)
        headers = inject_trace_context(dict(headers) if headers else None)
        return self._store.publish(exchange, routing_key, body, headers=headers)

    async def publish_bodies(
        self,
        exchange: str,
        routing_key: str,
        bodies: Sequence[bytes],
        *,
        headers: dict[str, Any] | None = None,
    ) -> list[str]:
        # As the real batch: all sizes checked before the first send, every message tried,
        # the first failure raised at the end.
        for body in bodies:
            codec.check_size(body, self.settings.max_body_bytes)
        results: list[str | BaseException] = []
        for body in bodies:
            try:
                results.append(
                    await self.publish_body(exchange, routing_key, body, headers=headers)
                )
            except Exception as exc:
                results.append(exc)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [str(result) for result in results]

    async def aclose(self) -> None:
        """Nothing to close: no connection was opened."""


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
