"""What one measurement declares: an exchange and the framework's topology for one queue.

The baseline consumers and publishers use exactly the queues a listener would get (quorum,
the same arguments), so that both sides of a ratio are measured on the same kind of queue.
Every name starts with `bench-` and carries a token unique to the measurement.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from listener import topology

__all__ = ["PREFIX", "RETRY_DELAYS", "Target", "new_token", "target"]

PREFIX = "bench-"
#: The bench listeners' retry delays: one, so each measurement declares only four queues.
RETRY_DELAYS = (1.0,)


@dataclass(frozen=True, slots=True)
class Target:
    """The exchange, routing key and queue of one measurement."""

    exchange: str
    routing_key: str
    queue: str

    @property
    def address(self) -> str:
        """`exchange.routing_key`, as a listener's `subscribes_to` spells it."""
        return f"{self.exchange}.{self.routing_key}"

    def topology(self) -> topology.Topology:
        """The framework's topology for this queue (what `amqp-listener run` declares)."""
        return topology.describe(
            exchange=self.exchange,
            binding_key=self.routing_key,
            queue=self.queue,
            retry_delays=RETRY_DELAYS,
        )


def new_token() -> str:
    """A fresh `bench-xxxxxxxx` token: the exchange of one measurement."""
    return f"{PREFIX}{uuid.uuid4().hex[:10]}"


def target(token: str, variant: str) -> Target:
    """Where the `variant` listener (or its baseline) of measurement `token` works."""
    return Target(exchange=token, routing_key=variant, queue=f"{token}.{variant}")
