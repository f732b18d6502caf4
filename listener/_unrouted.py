"""Delayed messages that came due with nowhere to go, and sending them on.

A delayed message leaves the last delay level through `delay.OUT_EXCHANGE`, bound to each
listener's queue. If that queue was deleted while the message waited (a listener renamed or
removed, a test broker wiped), the exchange's alternate exchange puts it in
`delay.UNROUTED` instead of dropping it. Its `CC` route still says where it was going: a
listener's queue, or an address.

Sending one on publishes a copy straight to that destination (no delay is left: it is due),
mandatory and confirmed, then acks the original. A destination that still does not exist
returns the copy, and the original stays where it is. Killed between a confirm and its ack,
the message is both sent and still waiting: sent again later, it arrives twice with the same
message id, which an idempotent listener drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from listener import _outgoing, delay, outcome
from listener._peek import Peek
from listener._pika_backend import pika_properties
from listener.parked import Parked

__all__ = ["Unrouted", "UnroutedResult", "send_on"]

#: Headers a copy drops: its route through the levels, and the broker's dead-letter record
#: of every level it waited in.
DROPPED = frozenset({delay.ROUTE_HEADER}) | outcome.BROKER_HEADERS


@dataclass(frozen=True, slots=True)
class Unrouted:
    """One message in `delay.UNROUTED`: its id, when it was due, and where it was going."""

    message_id: str
    due_at: str
    #: `exchange.routing_key`, or the listener's queue name; "" when its route names neither.
    destination: str

    @classmethod
    def read(cls, parked: Parked) -> Unrouted:
        where = delay.routed_destination(parked.headers)
        if where is None:
            destination = ""
        else:
            exchange, key = where
            destination = f"{exchange}.{key}" if exchange else key
        return cls(parked.message_id, str(parked.headers.get(delay.DUE_HEADER, "")), destination)

    def summary(self) -> dict[str, str]:
        return {"id": self.message_id, "due_at": self.due_at, "destination": self.destination}


@dataclass(slots=True)
class UnroutedResult:
    """What `send_on` did: messages sent on, and those kept because their destination still
    does not exist (or their route names none)."""

    sent: list[Unrouted] = field(default_factory=list)
    kept: list[Unrouted] = field(default_factory=list)


def send_on(connection: pika.BlockingConnection, peek: Peek, limit: int | None) -> UnroutedResult:
    """Send every message `peek` reads (at most `limit`) to its destination."""
    result = UnroutedResult()
    publisher = _Publisher(connection)
    try:
        for tag, parked in peek:
            if limit is not None and len(result.sent) >= limit:
                break
            message = Unrouted.read(parked)
            where = delay.routed_destination(parked.headers)
            if where is None or not publisher.publish(where, parked):
                result.kept.append(message)
                continue
            peek.channel.basic_ack(tag)
            result.sent.append(message)
    finally:
        publisher.close()
    return result


class _Publisher:
    """Confirmed, mandatory publishes on a channel of their own (reopened when the broker
    closes it for an exchange that does not exist)."""

    def __init__(self, connection: pika.BlockingConnection) -> None:
        self._connection = connection
        self._channel: Any = None

    def publish(self, where: tuple[str, str], parked: Parked) -> bool:
        """True once the broker confirmed the copy; False when it could not route it."""
        if self._channel is None or not self._channel.is_open:
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        headers = {k: v for k, v in parked.headers.items() if k not in DROPPED}
        copy = _outgoing.replayed(parked.properties, parked.body, headers)
        exchange, routing_key = where
        try:
            self._channel.basic_publish(
                exchange, routing_key, copy.body, pika_properties(copy), mandatory=True
            )
        except pika.exceptions.UnroutableError:
            return False
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:  # the address's exchange is gone too
                return False
            raise
        return True

    def close(self) -> None:
        if self._channel is not None and self._channel.is_open:
            self._channel.close()
