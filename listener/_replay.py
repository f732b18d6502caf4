"""Replaying parked messages: a fresh copy to the listener's queue, the parked one acked,
both in one AMQP transaction.

Why a transaction and not publisher confirms: with confirms, the ack can only follow the
confirm, so a command killed between the two leaves a message both replayed and parked; to
keep that to one message, confirms would have to be waited for one at a time (a few hundred
messages a second). A transaction commits a batch of publishes and acks together, so a kill
leaves each message on one side only, at thousands a second. The broker confirms the
publishes before it answers the commit.

One catch: a publish the broker cannot route is returned at commit, after the ack took
effect. The replay checks the listener's queue exists first; if it disappears meanwhile, the
returned copies are parked again from the originals in hand before the error is raised.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pika
import pika.spec

from listener import _outgoing, _pika_internals, outcome
from listener._peek import Peek
from listener._pika_backend import pika_properties
from listener.errors import Unroutable
from listener.parked import REPLAYS_HEADER, Parked, SortKey, sort_key

__all__ = ["Replaying"]

#: Messages per transaction: the first commit comes soon (a replay that meets an error
#: stops early), later ones grow to a size that makes thousands a second (each commit waits
#: for the broker's disk), while a returned batch stays cheap to park again.
FIRST_BATCH = 100
BATCH = 1000

#: Headers a replay drops: the failure record of the attempts before, and the broker's
#: counters. The body, the message id and the other properties are kept.
RESET_ON_REPLAY = (
    frozenset(
        {
            "x-attempts",
            "x-parked-reason",
            "x-exception-type",
            "x-exception-message",
            "x-exception-traceback",
            "x-first-failure-at",
            "x-last-failure-at",
            "x-host",
            "x-pid",
        }
    )
    | outcome.BROKER_HEADERS
)


class Replaying:
    """One replay run over a peek of the dead-letter queue; `done` collects what committed
    (message id -> its place in a listing)."""

    def __init__(
        self,
        connection: pika.BlockingConnection,
        peek: Peek,
        queue: str,
        done: dict[str, SortKey],
    ) -> None:
        self._connection = connection
        self._peek = peek
        self._channel = peek.channel
        self._queue = queue
        self._done = done
        self._open: dict[str, Parked] = {}  # replayed in the open transaction
        self._acked: list[tuple[str, SortKey]] = []
        self._returned: list[str] = []
        self._batch = FIRST_BATCH
        self._channel.add_on_return_callback(self._on_return)  # type: ignore[arg-type]
        # pika's blocking channel writes and polls the socket on every publish and ack: two
        # system calls per frame, most of a replay's time. Its underlying channel only
        # buffers them, and the commit (a blocking call) sends the batch in one go.
        self._buffered: Any = _pika_internals.buffered_channel(self._channel)

    def run(self, chosen: set[str] | None) -> None:
        """Replay the messages whose ids are in `chosen` (every one when None)."""
        for tag, parked in self._peek:
            if chosen is not None and parked.message_id not in chosen:
                continue
            key = parked.message_id or f"<no id, #{self._peek.taken}>"
            # One replay per message id: copies parked twice (a killed move) leave with it.
            if key not in self._done and key not in self._open:
                self._publish(parked)
                self._open[key] = parked
            self._buffered.basic_ack(tag)
            self._acked.append((key, sort_key(parked)))
            if len(self._acked) >= self._batch:
                self._commit()
                self._batch = min(2 * self._batch, BATCH)
        self._commit()

    def _publish(self, parked: Parked) -> None:
        headers = {k: v for k, v in parked.headers.items() if k not in RESET_ON_REPLAY}
        headers[REPLAYS_HEADER] = parked.replays + 1
        headers["x-replayed-at"] = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        copy = _outgoing.replayed(parked.properties, parked.body, headers)
        self._buffered.basic_publish(
            "", self._queue, copy.body, pika_properties(copy), mandatory=True
        )

    def _commit(self) -> None:
        if not self._acked:
            return
        self._channel.tx_commit()
        self._connection.process_data_events(time_limit=0)  # dispatches any basic.return
        if self._returned:
            self._park_again()
        for key, place in self._acked:
            if key not in self._returned:
                self._done.setdefault(key, place)
        self._open.clear()
        self._acked.clear()
        if self._returned:
            first = self._returned[0]
            raise Unroutable(
                f"the listener's queue {self._queue!r} disappeared during the replay: "
                f"{len(self._returned)} message(s) came back and are parked again. Run "
                "`amqp-listener declare MODULE`, then replay again",
                message_id=first,
            )

    def _park_again(self) -> None:
        dead_queue = self._peek.queue
        for key in self._returned:
            parked = self._open.get(key)
            if parked is None:
                continue
            copy = _outgoing.replayed(parked.properties, parked.body, parked.headers)
            self._channel.basic_publish("", dead_queue, copy.body, pika_properties(copy))
        self._channel.tx_commit()

    def _on_return(
        self,
        _channel: Any,
        _method: pika.spec.Basic.Return,
        properties: pika.spec.BasicProperties,
        _body: bytes,
    ) -> None:
        self._returned.append(str(properties.message_id or ""))
