"""The conformance harness: one small interface over the in-memory broker and RabbitMQ.

See conftest.py for how the `broker` fixture uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from support.waiting import eventually

from listener.apublisher import default_async_publisher
from listener.listener import Listener
from listener.outcome import BROKER_HEADERS
from listener.testing import MemoryBroker


@dataclass(frozen=True)
class Parked:
    """A parked message as either broker shows it."""

    message_id: str
    body: bytes
    headers: dict[str, Any]


class Harness(Protocol):
    kind: str

    def running(self, *listeners: type[Listener]) -> contextlib.AbstractAsyncContextManager[None]:
        """Host `listeners` for the block."""
        ...

    def publish_raw(
        self, exchange: str, key: str, body: bytes, *, content_type: str | None
    ) -> None:
        """Publish bytes as a foreign AMQP client would."""
        ...

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Let deliveries run until `predicate()` holds (fails the test if it never does)."""
        ...

    def parked(self, cls: type[Listener]) -> list[Parked]:
        """Everything parked in `cls`'s dead-letter queue so far, in order."""
        ...


class MemoryHarness:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.broker: MemoryBroker | None = None

    @contextlib.asynccontextmanager
    async def running(self, *listeners: type[Listener]) -> AsyncIterator[None]:
        with MemoryBroker(*listeners, fail_fast=False) as broker:
            self.broker = broker
            yield

    def publish_raw(
        self, exchange: str, key: str, body: bytes, *, content_type: str | None
    ) -> None:
        assert self.broker is not None
        self.broker.publish_raw(f"{exchange}.{key}", body, content_type=content_type)

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        assert self.broker is not None
        if self.kind == "memory-join":
            await asyncio.to_thread(self.broker.join)
        else:
            await self.broker.ajoin()
        # The queues are empty now: what has not happened will not.
        assert predicate(), f"{self.kind}: every queue is empty and still not {what}"

    def parked(self, cls: type[Listener]) -> list[Parked]:
        assert self.broker is not None
        return [Parked(m.message_id, m.body, m.headers) for m in self.broker.parked(cls)]


class RabbitHarness:
    kind = "rabbitmq"

    def __init__(self, run_worker: Any, rabbit: Any, settings: Any) -> None:
        self._run_worker = run_worker
        self._rabbit = rabbit
        # A sync handler left running past its timeout must not make the worker recycle
        # itself in the middle of a test.
        self._settings = settings.model_copy(update={"max_stuck_threads": 0})
        self._parked: dict[type[Listener], list[Parked]] = {}

    @contextlib.asynccontextmanager
    async def running(self, *listeners: type[Listener]) -> AsyncIterator[None]:
        try:
            async with self._run_worker(*listeners, worker_settings=self._settings):
                yield
        finally:
            await default_async_publisher().aclose()

    def publish_raw(
        self, exchange: str, key: str, body: bytes, *, content_type: str | None
    ) -> None:
        self._rabbit.publish(exchange, key, body, content_type=content_type)

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        try:
            await eventually(predicate, timeout=15)
        except AssertionError:
            raise AssertionError(f"rabbitmq: not {what} within 15 s") from None

    def parked(self, cls: type[Listener]) -> list[Parked]:
        taken = self._parked.setdefault(cls, [])
        while (got := self._rabbit.get(f"{cls.queue}.dead")) is not None:
            properties, body = got
            # Headers the broker writes itself (x-delivery-count, which the dead queue's
            # delivery limit brings) are not the framework's, and the kit does not model them.
            headers = {
                k: v for k, v in (properties.headers or {}).items() if k not in BROKER_HEADERS
            }
            taken.append(Parked(properties.message_id, body, headers))
        return list(taken)
