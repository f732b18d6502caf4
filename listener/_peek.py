"""Reading a queue without removing it: every message taken unacked, one at a time, and
every one not acked handed back at the end.

AMQP cannot browse a queue. A consumer that holds every message it was given unacked sees
each message once and reaches the end; the broker keeps the messages, and takes them back
if the reader dies. `basic.get` does the same one round trip per message (the old way: 480 s
for 100,000); a consumer streams, but a quorum queue gives an unlimited consumer only 2,000
messages in flight, and a prefetch is at most 65,535. So the reader adds one consumer per
window: when every consumer so far holds its full window, the next one gets the next
messages, in queue order. The broker sends a window as fast as it can, so a window is what
the client may have to hold at once: it is sized by bytes (`WINDOW_BYTES` of bodies, from
the average body seen so far), between `MIN_WINDOW` and `WINDOW` messages. The broker
holds the rest.

The queue's own order does not survive a hand-back (a quorum queue requeues a batch in an
order of its own), so listings sort by parking time, never by queue position.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pika.adapters.blocking_connection
import pika.spec

from listener.parked import Parked

__all__ = ["Peek"]

Channel = pika.adapters.blocking_connection.BlockingChannel

#: Messages one consumer may hold at most (~10 MiB of 1 KiB bodies), and at least.
WINDOW = 10_000
MIN_WINDOW = 100
#: Bytes of bodies one window may bring at once; the first window, sized before any body
#: was seen, holds `FIRST_WINDOW` messages.
WINDOW_BYTES = 16 * 1024 * 1024
FIRST_WINDOW = 500
#: Seconds without a delivery, before all the messages counted at the start were read,
#: after which the queue counts as read: another client took messages meanwhile. Generous,
#: because a busy broker can pause that long between windows, and stopping early would
#: leave a listing silently short.
IDLE = 10.0
#: Seconds to wait, once the depth is read, for messages handed back just before.
GRACE = 0.1


class Peek:
    """The messages now in `queue`, taken unacked; `hand_back()` returns the rest.

    With `transactional`, the channel runs in AMQP transaction mode, so that a replay's
    publishes and acks take effect together at `tx_commit()`.
    """

    def __init__(
        self,
        connection: pika.BlockingConnection,
        queue: str,
        *,
        transactional: bool = False,
    ) -> None:
        self.queue = queue
        self._connection = connection
        self.channel: Channel = connection.channel()
        self.transactional = transactional
        if transactional:
            self.channel.tx_select()
        self._pending: collections.deque[tuple[int, Any, bytes]] = collections.deque()
        self._consumers: list[str] = []
        self._capacity = 0  # messages all consumers so far may hold
        self._received = 0
        self._received_bytes = 0
        self.taken = 0
        self._depth: int | None = None
        self._straggling = False

    def __iter__(self) -> Iterator[tuple[int, Parked]]:
        return self

    def __next__(self) -> tuple[int, Parked]:
        """The next message (its delivery tag, read), until the messages there at the first
        call have all been read."""
        if self._depth is None:
            declared = self.channel.queue_declare(self.queue, passive=True)
            self._depth = declared.method.message_count or 0
        if not self._pending:
            if self.taken >= self._depth:
                self._wait_stragglers()
            elif self.taken >= self._capacity:
                self._add_consumer()
            if not self._pending:
                self._wait(IDLE)
            if not self._pending:
                self._depth = self.taken
                raise StopIteration
        tag, properties, body = self._pending.popleft()
        self.taken += 1
        return tag, Parked.read(properties, body)

    def hand_back(self) -> None:
        """Return every message not acked to the queue (the broker does it anyway when the
        connection closes, if this is never reached)."""
        if not self.channel.is_open:
            return
        with contextlib.suppress(Exception):
            for consumer_tag in self._consumers:
                self.channel.basic_cancel(consumer_tag)
            if self.transactional:
                self.channel.tx_rollback()
            if self.taken:
                self.channel.basic_nack(0, multiple=True, requeue=True)
            if self.transactional:
                self.channel.tx_commit()
        with contextlib.suppress(Exception):
            self.channel.close()

    def _wait_stragglers(self) -> None:
        # The depth is read from the queue's local state, which may not show yet messages
        # another command handed back a moment ago: listen a little longer, once.
        if self._straggling:
            raise StopIteration
        self._straggling = True
        if not self._consumers:
            self._add_consumer()
        self._wait(GRACE)
        if not self._pending:
            raise StopIteration

    def _wait(self, seconds: float) -> None:
        """Wait up to `seconds` for a delivery. (pika returns from one call as soon as it
        dispatched anything, a frame for another channel included.)"""
        deadline = time.monotonic() + seconds
        while not self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # pika takes fractions of a second; its type stubs say int.
            self._connection.process_data_events(time_limit=left)  # type: ignore[arg-type]

    def _add_consumer(self) -> None:
        window = FIRST_WINDOW
        if self._received:
            average = max(self._received_bytes // self._received, 1)
            window = max(MIN_WINDOW, min(WINDOW, WINDOW_BYTES // average))
        self._capacity += window
        # A consumer's prefetch is set by the basic.qos before its basic.consume.
        self.channel.basic_qos(prefetch_count=window)
        self._consumers.append(self.channel.basic_consume(self.queue, self._on_message))

    def _on_message(
        self,
        _channel: Channel,
        method: pika.spec.Basic.Deliver,
        properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        self._received += 1
        self._received_bytes += len(body)
        self._pending.append((method.delivery_tag or 0, properties, body))
