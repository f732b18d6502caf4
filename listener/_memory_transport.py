"""The in-memory `DeliveryTransport`: a `MemoryBroker`'s queues, as a consumer sees them.

`listener.testing` drives the runner's own `Consumer` through this transport, so a test
settles its messages with the code a worker runs. What the consumer moves lands where
RabbitMQ would put it: a copy published to a listener's queue is queued again; to one of its
`retry_delays` queues or its delay levels, it waits on the virtual clock for that delay; to
`<queue>.dead`, it is recorded as a `ParkedMessage`. A move to any other queue is
`Unroutable`, as a mandatory publish to RabbitMQ would be.

Topology is the store's business (`MemoryBroker.subscribe` declares a listener's queues), so
`declare()` has nothing to do; nor has `wait_sent()`, as an ack here takes effect at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from listener import delay as _delay
from listener._memory_broker import Envelope, ParkedMessage, Store
from listener.codec import DecodeFailure
from listener.errors import Unroutable
from listener.outcome import ATTEMPTS_HEADER
from listener.topology import dead_queue_name, delay_queue_name

if TYPE_CHECKING:
    from listener._outgoing import Outgoing
    from listener.listener import Listener
    from listener.runner.transport import Incoming
    from listener.topology import Topology

__all__ = ["MemoryInbound", "MemoryTransport"]


@dataclass(frozen=True, slots=True)
class _Properties:
    """The properties a message of the in-memory broker has (the rest are never set)."""

    message_id: str | None
    content_type: str | None
    content_encoding: str | None
    expiration: str | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    timestamp: int | None = None
    type: str | None = None
    app_id: str | None = None


class MemoryInbound:
    """One delivery from a `Store`: settled by `ack()`, or put back at the head of the
    queues by `nack(requeue=True)` (as the broker would requeue it)."""

    __slots__ = (
        "body",
        "envelope",
        "exchange",
        "headers",
        "listener",
        "properties",
        "redelivered",
        "routing_key",
        "settled",
        "store",
    )

    def __init__(self, store: Store, listener: type[Listener], envelope: Envelope) -> None:
        self.store = store
        self.listener = listener
        self.envelope = envelope
        self.body = envelope.body
        self.headers: Mapping[str, Any] = envelope.headers
        self.exchange = envelope.exchange
        self.routing_key = envelope.routing_key
        self.redelivered = False
        self.properties = _Properties(
            envelope.message_id, envelope.content_type, envelope.content_encoding
        )
        self.settled = False

    def __repr__(self) -> str:
        return f"<MemoryInbound {self.listener.queue} id={self.message_id} settled={self.settled}>"

    @property
    def message_id(self) -> str | None:
        return self.envelope.message_id

    @property
    def channel_closed(self) -> bool:
        return False  # no connection to lose

    @property
    def processed(self) -> bool:
        return self.settled

    def ack(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        return True

    def nack(self, *, requeue: bool = True) -> bool:
        if self.settled:
            return False
        self.settled = True
        if requeue:
            self.store.put_back(self.listener, self.envelope)
        return True


class _Consumption:
    """A queue consumed from the store, until cancelled or closed."""

    def __init__(self, transport: MemoryTransport, queue: str) -> None:
        self._transport = transport
        self._queue = queue

    async def cancel(self) -> None:
        self._transport.callbacks.pop(self._queue, None)

    async def close(self) -> None:
        await self.cancel()


class MemoryTransport:
    """The `DeliveryTransport` over a `Store` (see the module)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        #: Queue name -> the consumer's callback.
        self.callbacks: dict[str, Callable[[Incoming], None]] = {}

    async def declare(self, topology: Topology, *, again: bool = False) -> None:
        """Nothing to do: subscribing a listener declared its queues."""

    async def consume(
        self, queue_name: str, prefetch: int, callback: Callable[[Incoming], None]
    ) -> _Consumption:
        """Deliver `queue_name`'s messages to `callback` (one at a time: `prefetch` is moot)."""
        self.subscribe(queue_name, callback)
        return _Consumption(self, queue_name)

    def subscribe(self, queue_name: str, callback: Callable[[Incoming], None]) -> None:
        """`consume()`, without an event loop."""
        self.callbacks[queue_name] = callback

    def deliver(self, listener: type[Listener], envelope: Envelope) -> MemoryInbound:
        """Hand one message taken from the store to its queue's consumer."""
        message = MemoryInbound(self.store, listener, envelope)
        self.callbacks[listener.queue](message)
        return message

    async def publish_to_queue(self, queue_name: str, message: Outgoing) -> None:
        """Put a copy in `queue_name`, as RabbitMQ would (see the module); confirmed at once.

        Raises:
            Unroutable: no queue of a subscribed listener has that name.
        """
        headers = dict(message.headers or {})
        message_id = message.message_id or None
        store = self.store
        for cls in store.listeners:
            envelope = Envelope(
                message.body,
                headers,
                message_id,
                message.content_type,
                message.content_encoding,
                "",  # moved through the default exchange, by queue name
                cls.queue,
            )
            if queue_name == dead_queue_name(cls.queue):
                self._park(cls, envelope)
                return
            delay = _delay_of(cls, queue_name, headers)
            if delay is not None:
                store.enqueue(cls, envelope, delay=delay)
                return
        raise Unroutable(
            f"message {message_id} was returned unroutable: no queue {queue_name!r} in the "
            "MemoryBroker",
            message_id=message_id,
        )

    async def wait_sent(self) -> None:
        """Nothing to wait for: an ack takes effect at once."""

    def _park(self, cls: type[Listener], envelope: Envelope) -> None:
        headers = envelope.headers
        try:
            value = cls.codec.decode(
                envelope.body, envelope.content_type, envelope.content_encoding
            )
        except DecodeFailure:
            value = None
        attempts = headers.get(ATTEMPTS_HEADER)
        parked = ParkedMessage(
            message_id=envelope.message_id or "",
            body=envelope.body,
            message=value,
            headers=headers,
            reason=str(headers.get("x-parked-reason", "")),
            exception_type=str(headers.get("x-exception-type", "")),
            exception_message=str(headers.get("x-exception-message", "")),
            attempts=attempts if isinstance(attempts, int) else 0,
            listener=cls,
        )
        with self.store.lock:
            self.store.parked[cls].append(parked)


def _delay_of(cls: type[Listener], queue_name: str, headers: Mapping[str, Any]) -> float | None:
    """How long a copy moved to `queue_name` waits before `cls` gets it; None when the queue
    is none of `cls`'s own."""
    if queue_name == cls.queue:
        return 0.0
    for seconds in cls.retry_delays:
        if queue_name == delay_queue_name(cls.queue, seconds):
            return float(seconds)
    levels = {_delay.level_name(n) for n in range(_delay.LEVELS)}
    if queue_name in levels and _delay.routed_target(dict(headers)) == cls.queue:
        # The route in the headers says how long, from the first level on, and to whom.
        return _delay.routed_delay(dict(headers)) or 0.0
    return None
