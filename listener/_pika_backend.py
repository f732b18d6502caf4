"""Sending on pika: the backend of the synchronous `Publisher`, and the property conversion
the operator's replays use.

pika's BlockingConnection is not thread-safe, so each thread gets its own connection and
confirm-mode channel (opened on first use). Every client exception is translated here, at
the boundary, into the PublishError family.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pika
import pika.adapters.blocking_connection
import pika.exceptions
import pika.spec

from listener import _nodes, _pika_internals
from listener._amqp_errors import is_connection_lost, publish_error
from listener._outgoing import Outgoing
from listener.errors import PublishTimeout
from listener.settings import Settings

__all__ = ["PikaBackend", "pika_properties"]


def pika_properties(message: Outgoing) -> pika.BasicProperties:
    """`message`'s properties in pika's type."""
    return pika.BasicProperties(
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=message.headers,
        delivery_mode=pika.spec.PERSISTENT_DELIVERY_MODE
        if message.persistent
        else pika.spec.TRANSIENT_DELIVERY_MODE,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id or None,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


class _ConfirmTimedOut(Exception):
    """Raised from a pika timer inside a blocking publish when the confirm is late."""


class _ThreadChannel:
    """One thread's connection and confirm-mode channel."""

    __slots__ = ("_adapter", "_readable", "channel", "connection", "owner")

    def __init__(self, connection: pika.BlockingConnection) -> None:
        self.connection = connection
        self.channel = connection.channel()
        self.channel.confirm_delivery()
        self.owner = threading.current_thread()
        # The SelectConnection underneath: its timers, socket and writer (_pika_internals).
        self._adapter: Any = _pika_internals.select_connection(connection)
        self._readable = _pika_internals.readable_probe(self._adapter)
        _pika_internals.coalesce_frames(self._adapter)

    def arm_deadline(self, seconds: float) -> object:
        """Make a blocking publish raise _ConfirmTimedOut after `seconds`.

        BlockingConnection.call_later timers fire only inside process_data_events(), never
        while basic_publish() waits for its confirm; a timer on the adapter underneath fires
        inside that wait too. pika 1.x exposes no public hook for this.
        """
        return _pika_internals.call_later(self._adapter, seconds, _raise_timed_out)

    def disarm(self, timer: object) -> None:
        _pika_internals.remove_timeout(self._adapter, timer)

    def abort(self) -> None:
        """Drop the connection without the closing handshake (the peer may not answer).

        pika has no public abort: terminate the stream as a lost one, let the I/O loop run
        its callbacks once, then close the loop and its wake-up sockets.
        """
        _pika_internals.terminate(self._adapter, "dropped: the broker did not confirm in time")

    def alive(self) -> bool:
        if not (self.connection.is_open and self.channel.is_open):
            return False
        if self._readable is not None and not self._readable():
            return True  # nothing arrived while idle: no close, no heartbeat to answer
        try:
            # Reads what the broker sent while we were idle: a connection closed for missed
            # heartbeats or a forced close is noticed here, before anything is published.
            self.connection.process_data_events(time_limit=0)
        except Exception:
            return False
        return self.connection.is_open and self.channel.is_open

    def discard(self) -> None:
        """Close politely if the connection still works; otherwise just drop it."""
        if not self.connection.is_open:
            return
        try:
            self.connection.close()
        except Exception:
            self.abort()


class PikaBackend:
    """A connection per thread; sends wait for the broker's confirm."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[_ThreadChannel] = set()

    def describe(self) -> str:
        """For the publisher's repr: the redacted URL and the connections open."""
        return f"url={self.settings.redacted_url!r} connections={len(self._open)}"

    def send(self, exchange: str, routing_key: str, message: Outgoing) -> None:
        """Publish `message` mandatory and wait for its confirm (`confirm_timeout` at most).

        Raises:
            PublishError: a subclass saying why the message may not be with the broker.
        """
        message_id = message.message_id
        properties = pika_properties(message)
        slot = self._slot()
        timer = slot.arm_deadline(self.settings.confirm_timeout)
        try:
            slot.channel.basic_publish(
                exchange, routing_key, message.body, properties, mandatory=True
            )
        except _ConfirmTimedOut:
            # The confirm may still come, and the broker may not be answering at all: abort
            # the connection rather than wait for a polite close.
            self._drop(slot, abort=True)
            raise PublishTimeout(
                f"no confirm for message {message_id} within {self.settings.confirm_timeout}s. "
                "Outcome unknown: it may be queued; publishing it again may duplicate it",
                message_id=message_id,
            ) from None
        except Exception as exc:
            # A nacked publish reopens too: on RabbitMQ 3.10, a channel that first published
            # just after a quorum leader's node died has every later publish nacked.
            if is_connection_lost(exc) or isinstance(
                exc, pika.exceptions.ChannelClosed | pika.exceptions.NackError
            ):
                self._drop(slot)
            raise publish_error(
                exc, exchange=exchange, routing_key=routing_key, message_id=message_id
            ) from exc
        finally:
            slot.disarm(timer)

    def close(self) -> None:
        """Close every thread's connection. They are opened again if used again."""
        with self._lock:
            slots, self._open = self._open, set()
        for slot in slots:
            slot.discard()
        self._local = threading.local()

    def _slot(self) -> _ThreadChannel:
        slot: _ThreadChannel | None = getattr(self._local, "slot", None)
        if slot is not None and slot.alive():
            return slot
        if slot is not None:
            self._drop(slot)
        self._close_orphans()
        name = f"amqp-listener publisher pid={os.getpid()}"

        def open_one(node: _nodes.Node) -> _ThreadChannel:
            parameters = _nodes.pika_parameters(self.settings, node, name)
            parameters.blocked_connection_timeout = self.settings.confirm_timeout
            return _ThreadChannel(pika.BlockingConnection(parameters))

        slot = _nodes.connect(self.settings, open_one, what="publisher", publishing=True)
        self._local.slot = slot
        with self._lock:
            self._open.add(slot)
        return slot

    def _drop(self, slot: _ThreadChannel, *, abort: bool = False) -> None:
        with self._lock:
            self._open.discard(slot)
        if getattr(self._local, "slot", None) is slot:
            self._local.slot = None
        if abort:
            slot.abort()
        else:
            slot.discard()

    def _close_orphans(self) -> None:
        # Connections of threads that have ended (a thread-per-request server) would
        # otherwise stay open forever. Closing one from here is safe: its thread is gone.
        with self._lock:
            orphans = {slot for slot in self._open if not slot.owner.is_alive()}
            self._open -= orphans
        for slot in orphans:
            slot.discard()


def _raise_timed_out() -> None:
    raise _ConfirmTimedOut
