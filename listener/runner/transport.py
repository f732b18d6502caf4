"""The seam between a consumer and a broker: what delivering messages needs, and no more.

`listener.runner.consumer.Consumer` settles every delivery through these few operations:
declare a listener's topology, consume its queue, move a copy of a message to a queue and
wait for the confirm, and ack or nack the message it got. Two implementations exist:

* RabbitMQ's, in a worker: `listener.runner.amqp_transport.Transport`, whose deliveries
  are `listener.runner.inbound.Inbound`;
* the in-memory one of `listener.testing` (`listener._memory_transport`), over the queues of
  a `MemoryBroker`.

Both pass the conformance suite (tests/conformance), so a test on the in-memory broker
exercises the same settling code as production. Protocols rather than a base class: the
RabbitMQ side stays free of the test kit, and each side is checked by mypy where it is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from listener._outgoing import Outgoing
    from listener.topology import Topology

__all__ = ["Consuming", "DeliveryTransport", "Incoming", "Properties"]


class Properties(Protocol):
    """The AMQP properties of a delivery that the consumer reads (pika's `BasicProperties`
    has them all)."""

    @property
    def message_id(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def expiration(self) -> str | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def timestamp(self) -> int | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def app_id(self) -> str | None: ...


class Incoming(Protocol):
    """One delivery, as the consumer sees it: read-only, settled with `ack()` or `nack()`."""

    body: bytes
    headers: Mapping[str, Any]
    exchange: str
    routing_key: str
    redelivered: bool

    @property
    def properties(self) -> Properties: ...

    @property
    def message_id(self) -> str | None: ...

    @property
    def channel_closed(self) -> bool:
        """Whether the delivery's channel is gone (the broker has the message back, then)."""
        ...

    @property
    def processed(self) -> bool:
        """Whether it was settled (or returned) already, or its channel is gone."""
        ...

    def ack(self) -> bool:
        """Settle it; False when it cannot be (its channel is gone)."""
        ...

    def nack(self, *, requeue: bool = True) -> bool:
        """Return it to the broker; False when settled already or its channel is gone."""
        ...


class Consuming(Protocol):
    """A queue being consumed: what `DeliveryTransport.consume` returns."""

    async def cancel(self) -> None:
        """No new deliveries; those received can still be settled."""
        ...

    async def close(self) -> None:
        """Stop consuming; unsettled deliveries go back to the queue."""
        ...


class DeliveryTransport(Protocol):
    """What a consumer needs of a broker (see the module)."""

    async def declare(self, topology: Topology, *, again: bool = False) -> None:
        """Declare a listener's exchanges, queues and bindings (idempotent); the delay
        levels every listener shares once per connection, or `again`.

        Raises:
            BrokerError: a refusal (TopologyMismatch for a queue declared otherwise).
        """
        ...

    async def consume(
        self, queue_name: str, prefetch: int, callback: Callable[[Incoming], None]
    ) -> Consuming:
        """Deliver `queue_name`'s messages to `callback`, at most `prefetch` unsettled.

        Raises:
            BrokerError: the broker refused (no such queue, ...).
        """
        ...

    async def publish_to_queue(self, queue_name: str, message: Outgoing) -> None:
        """Put `message` in `queue_name` (by name, mandatory) and wait for the confirm.

        Raises:
            PublishError: a subclass (`Unroutable` for no such queue); the caller must not
                ack the original.
        """
        ...

    async def wait_sent(self) -> None:
        """Wait (bounded) until the acks marked so far have left this process."""
        ...
