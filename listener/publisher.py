"""Synchronous, confirmed publishing on pika: `notify()` and `listener.publish()`.

pika's BlockingConnection is not thread-safe, so each thread gets its own connection and
channel (opened on first use). Every publish is persistent, mandatory and confirmed: the
call returns only once the broker has taken responsibility for the message, or raises a
PublishError saying why it may not have.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from typing import Any

import pika
import pika.adapters.blocking_connection
import pika.exceptions
import pika.spec

from listener import _nodes, _pika_internals, _redirect, codec, routing
from listener import delay as _delay
from listener._amqp_errors import is_connection_lost, publish_error
from listener.errors import PublishTimeout
from listener.settings import Settings, get_settings
from listener.tracing import inject_trace_context

__all__ = ["Publisher", "default_publisher", "publish"]

log = logging.getLogger("listener.publisher")


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


class Publisher:
    """Publishes with confirms from any number of threads.

    Example:
        publisher = Publisher()
        message_id = publisher.publish("case_files.copy_requested", {"case_id": 1})
        publisher.close()
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[_ThreadChannel] = set()
        self._published = 0

    def __repr__(self) -> str:
        return (
            f"<Publisher url={self.settings.redacted_url!r} connections={len(self._open)} "
            f"published={self._published}>"
        )

    def publish(
        self,
        address: str,
        value: Any,
        *,
        headers: dict[str, Any] | None = None,
        delay: float | dt.timedelta | None = None,
        at: dt.datetime | None = None,
    ) -> str:
        """Publish `value` as JSON to `"exchange.routing_key"` and wait for the confirm.
        With `delay=` seconds or `at=` an aware datetime, it reaches every listener bound
        there at that moment (see `listener.delay`).

        Returns:
            The message id.
        """
        exchange, key = routing.parse_address(address, wildcards=False)
        seconds = _delay.seconds_until(delay=delay, at=at)
        exchange, key, headers = _delay.address_route(exchange, key, headers, seconds)
        return self.publish_body(exchange, key, codec.encode(value), headers=headers)

    def publish_body(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        properties: pika.BasicProperties | None = None,
    ) -> str:
        """Publish an encoded body; `properties` replaces the standard ones when given."""
        codec.check_size(body, self.settings.max_body_bytes)
        if properties is None:
            properties = pika.BasicProperties(
                content_type=codec.CONTENT_TYPE,
                delivery_mode=pika.spec.PERSISTENT_DELIVERY_MODE,
                message_id=codec.new_message_id(),
                timestamp=codec.now_timestamp(),
                headers=inject_trace_context(dict(headers) if headers else None),
            )
        message_id = str(properties.message_id)
        slot = self._slot()
        timer = slot.arm_deadline(self.settings.confirm_timeout)
        try:
            slot.channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
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
        self._published += 1
        return message_id

    def close(self) -> None:
        """Close every thread's connection. The publisher re-opens them if used again."""
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


_default: Publisher | None = None
_default_lock = threading.Lock()


def default_publisher() -> Publisher:
    """The process-wide publisher behind `notify()` and `publish()` (while a
    `listener.testing.MemoryBroker` is active, that broker's)."""
    redirect = _redirect.active
    if redirect is not None:
        return redirect.publisher
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Publisher()
    return _default


def publish(
    address: str,
    value: Any,
    *,
    headers: dict[str, Any] | None = None,
    session: Any = None,
    ordering_key: str | None = None,
    delay: float | dt.timedelta | None = None,
    at: dt.datetime | None = None,
) -> str:
    """Publish `value` as JSON to `"exchange.routing_key"`, confirmed. Returns the message id.

    For services that do not import the listener's code. `delay=` (seconds) or `at=` (an
    aware datetime) holds it in the broker until then. Raises a PublishError subclass when
    the message is not known to be safely with the broker. With `session` (a SQLAlchemy
    `Session`), the message goes to the outbox in its transaction, as `notify()` does (a
    delay then counts from the commit).
    """
    if session is not None or ordering_key is not None:
        from listener import outbox

        exchange, key = routing.parse_address(address, wildcards=False)
        body = codec.encode(value)
        headers = _delay.due_headers(headers, delay=delay, at=at)
        return outbox.write(
            session, exchange, key, [body], headers=headers, ordering_key=ordering_key
        )[0]
    return default_publisher().publish(address, value, headers=headers, delay=delay, at=at)


def _forget_after_fork() -> None:
    # A child must not use (or close) the parent's sockets: start afresh.
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
