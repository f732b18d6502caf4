"""The in-memory broker's state: exchanges, bindings, queues, a virtual clock, publishers.

What `listener.testing.MemoryBroker` holds between deliveries lives in a `Store`, behind
one lock, so that `notify()` is safe from any thread (a handler, a web app under test).
Routing is RabbitMQ's topic routing (`listener.routing`); every publish is mandatory, as
the real publishers' are: a message no queue is bound for raises `Unroutable`. The
publishers that `notify()` gets while the broker is active are in `_memory_publishers`.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import json
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from listener import codec, routing
from listener import delay as _delay
from listener.errors import Unroutable

if TYPE_CHECKING:
    from listener.listener import Listener

__all__ = ["Clock", "Envelope", "ParkedMessage", "PublishedMessage", "Store"]

_NEXT_STEP = (
    "subscribe the listener that should get it (MemoryBroker(..., TheListener) or "
    "broker.subscribe(TheListener)), or broker.bind('exchange.key') for messages no "
    "listener of yours consumes"
)


class Clock:
    """The broker's virtual clock, in seconds since the broker was created.

    It moves only when `join()` waits for a retry, when an async handler waits idle under
    `join()` (the wait is skipped), and on `MemoryBroker.advance()`; never by itself.
    """

    __slots__ = ("_epoch", "_now")

    def __init__(self) -> None:
        self._now = 0.0
        self._epoch = dt.datetime.now(dt.UTC)

    def __repr__(self) -> str:
        return f"<Clock now={self._now:g}s>"

    @property
    def now(self) -> float:
        """Virtual seconds since the broker was created."""
        return self._now

    @property
    def datetime(self) -> dt.datetime:
        """The wall-clock time `now` stands for (UTC): what failure headers are stamped with."""
        return self._epoch + dt.timedelta(seconds=self._now)

    def _advance(self, seconds: float) -> None:
        self._now += seconds


@dataclass(frozen=True, slots=True)
class PublishedMessage:
    """A message the broker took while active, from `notify()`, `publish()`, their async
    twins and batches, or `MemoryBroker.publish_raw()`; in the order they were published."""

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    message_id: str
    content_type: str | None = codec.CONTENT_TYPE
    content_encoding: str | None = None

    @property
    def address(self) -> str:
        """`"exchange.routing_key"`, as `subscribes_to` and `listener.publish()` write it."""
        return f"{self.exchange}.{self.routing_key}"

    def json(self) -> Any:
        """The body, decoded as JSON."""
        return json.loads(self.body)

    def decode(self, listener: type[Listener]) -> Any:
        """The body as `listener.handle()` would get it (its model), or raise DecodeFailure."""
        return listener.codec.decode(self.body, self.content_type, self.content_encoding)


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """A message parked in a listener's dead-letter queue, with the runner's headers."""

    message_id: str
    body: bytes
    #: The decoded message, or None when the body could not be decoded.
    message: Any
    #: Every header the parked copy carries: `x-parked-reason`, `x-attempts`, ...
    headers: dict[str, Any]
    reason: str
    exception_type: str
    exception_message: str
    attempts: int
    listener: type[Listener]

    @property
    def traceback(self) -> str:
        """The handler's traceback (`x-exception-traceback`), or "" when none ran."""
        value = self.headers.get("x-exception-traceback", "")
        return value if isinstance(value, str) else ""

    def json(self) -> Any:
        """The body, decoded as JSON."""
        return json.loads(self.body)


@dataclass(slots=True)
class Envelope:
    """One message in a queue: the body and properties a consumer would receive."""

    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    content_type: str | None
    content_encoding: str | None
    exchange: str
    routing_key: str


class Store:
    """Queues, bindings and records of one MemoryBroker; every method takes the lock."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.lock = threading.RLock()
        self.listeners: list[type[Listener]] = []
        #: Bindings with no listener behind them (`MemoryBroker.bind`): routable, never consumed.
        self.sinks: list[routing.Address] = []
        self.ready: deque[tuple[type[Listener], Envelope]] = deque()
        #: Messages waiting for a retry: (due, order, listener, message), a heap.
        self.delayed: list[tuple[float, int, type[Listener], Envelope]] = []
        self.published: list[PublishedMessage] = []
        self.handled: dict[type[Listener], list[Any]] = {}
        self.parked: dict[type[Listener], list[ParkedMessage]] = {}
        self.counts = {"handled": 0, "retried": 0, "parked": 0}
        self._order = itertools.count()

    # -- topology ---------------------------------------------------------------------------

    def add_listener(self, cls: type[Listener]) -> None:
        with self.lock:
            if cls in self.listeners:
                return
            for other in self.listeners:
                if other.queue == cls.queue:
                    raise ValueError(
                        f"{other.name()} and {cls.name()} both use queue {cls.queue!r}: each "
                        "listener owns its queue; set queue = '...' on one of them"
                    )
            self.listeners.append(cls)
            self.handled[cls] = []
            self.parked[cls] = []

    def add_sink(self, address: routing.Address) -> None:
        with self.lock:
            if address not in self.sinks:
                self.sinks.append(address)

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None,
        message_id: str | None = None,
        content_type: str | None = codec.CONTENT_TYPE,
        content_encoding: str | None = None,
    ) -> str:
        """Route a message to every queue bound for it, as a mandatory publish.

        Raises:
            Unroutable: the exchange does not exist, or no queue is bound for the key.
        """
        message_id = message_id or codec.new_message_id()
        with self.lock:
            delay = _delay.routed_delay(headers)
            if delay is not None:
                exchange, routing_key = self._undelayed(exchange, routing_key, headers)
            targets = self._route(exchange, routing_key, message_id)
            self.published.append(
                PublishedMessage(
                    exchange,
                    routing_key,
                    body,
                    dict(headers or {}),
                    message_id,
                    content_type,
                    content_encoding,
                )
            )
            for cls in targets:
                envelope = Envelope(
                    body,
                    dict(headers or {}),
                    message_id,
                    content_type,
                    content_encoding,
                    exchange,
                    routing_key,
                )
                self.enqueue(cls, envelope, delay=delay or 0.0)
        return message_id

    def _undelayed(
        self, exchange: str, routing_key: str, headers: dict[str, Any] | None
    ) -> tuple[str, str]:
        # Where a delayed message ends up: the address it entered the delay levels with, or
        # the listener queue its route names (by its queue's name, from the default exchange).
        if exchange == _delay.ENTRY_EXCHANGE and routing_key.startswith("x."):
            exchange, _, routing_key = routing_key[2:].partition(".")
            return exchange, routing_key
        prefix = _delay.target_key("")
        if exchange == _delay.ENTRY_EXCHANGE and routing_key.startswith(prefix):
            return "", routing_key.removeprefix(prefix)
        queue = _delay.routed_target(headers)  # published to its first level by name
        if queue is not None:
            return "", queue
        return exchange, routing_key

    def _route(self, exchange: str, routing_key: str, message_id: str) -> list[type[Listener]]:
        if not exchange:  # the default exchange: a queue by its name
            targets = [cls for cls in self.listeners if cls.queue == routing_key]
            if not targets:
                raise Unroutable(
                    f"message {message_id} was returned unroutable: no queue {routing_key!r} "
                    f"in the MemoryBroker: {_NEXT_STEP}",
                    message_id=message_id,
                )
            return targets
        exchanges = {cls.exchange for cls in self.listeners} | {a.exchange for a in self.sinks}
        if exchange not in exchanges:
            # The real publishers raise Unroutable for a missing exchange too.
            raise Unroutable(
                f"exchange {exchange!r} does not exist in the MemoryBroker, so message "
                f"{message_id} was not published: {_NEXT_STEP}",
                message_id=message_id,
            )
        targets = [
            cls
            for cls in self.listeners
            if cls.exchange == exchange and routing.topic_matches(cls.routing_key, routing_key)
        ]
        bound = any(
            sink.exchange == exchange and routing.topic_matches(sink.routing_key, routing_key)
            for sink in self.sinks
        )
        if not targets and not bound:
            raise Unroutable(
                f"message {message_id} was returned unroutable: no queue is bound to exchange "
                f"{exchange!r} with routing key {routing_key!r} in the MemoryBroker: "
                f"{_NEXT_STEP}",
                message_id=message_id,
            )
        return targets

    # -- queues -----------------------------------------------------------------------------

    def enqueue(self, cls: type[Listener], envelope: Envelope, *, delay: float = 0.0) -> None:
        """Put `envelope` at the back of `cls`'s queue, now or once `delay` seconds passed."""
        with self.lock:
            if delay <= 0:
                self.ready.append((cls, envelope))
            else:
                due = self.clock.now + delay
                heapq.heappush(self.delayed, (due, next(self._order), cls, envelope))

    def put_back(self, cls: type[Listener], envelope: Envelope) -> None:
        """Return a delivery that got no outcome to the head of the queues."""
        with self.lock:
            self.ready.appendleft((cls, envelope))

    def take(self, *, wait_for_retries: bool) -> tuple[type[Listener], Envelope] | None:
        """The next ready delivery; when none is ready and `wait_for_retries`, the clock
        jumps to the next retry due. None when nothing is left to deliver."""
        with self.lock:
            if not self.ready and self.delayed and wait_for_retries:
                self.advance(max(0.0, self.delayed[0][0] - self.clock.now))
            return self.ready.popleft() if self.ready else None

    def advance(self, seconds: float) -> None:
        """Move the clock; retries that came due go to the back of their queues, in order."""
        with self.lock:
            self.clock._advance(seconds)
            while self.delayed and self.delayed[0][0] <= self.clock.now:
                _due, _order, cls, envelope = heapq.heappop(self.delayed)
                self.ready.append((cls, envelope))

    def pending(self, cls: type[Listener] | None = None) -> int:
        """Messages ready or waiting for a retry (of `cls`, or of every listener)."""
        with self.lock:
            ready = sum(1 for owner, _ in self.ready if cls is None or owner is cls)
            waiting = sum(1 for _, _, owner, _ in self.delayed if cls is None or owner is cls)
            return ready + waiting
