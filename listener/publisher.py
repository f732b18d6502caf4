"""Synchronous, confirmed publishing: `notify()` and `listener.publish()`.

The publisher validates and builds each message (`listener._outgoing`); its backend sends
it (on pika, a connection per thread: `listener._pika_backend`). Every publish is
persistent, mandatory and confirmed: the call returns only once the broker has taken
responsibility for the message, or raises a PublishError saying why it may not have.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from typing import Any, Protocol

from listener import _outgoing, _redirect, codec, routing
from listener import delay as _delay
from listener._outgoing import Outgoing
from listener._pika_backend import PikaBackend
from listener.settings import Settings, get_settings

__all__ = ["Publisher", "SyncBackend", "default_publisher", "publish"]


class SyncBackend(Protocol):
    """What sends for a Publisher: pika (`listener._pika_backend`) or, in tests, the memory
    broker (`listener._memory_publishers`)."""

    def describe(self) -> str:
        """A few words for the publisher's repr."""
        ...

    def send(self, exchange: str, routing_key: str, message: Outgoing) -> None:
        """Send one message and wait for its confirm; raises a PublishError."""
        ...

    def close(self) -> None:
        """Close the connections, if any."""
        ...


class Publisher:
    """Publishes with confirms from any number of threads.

    Example:
        publisher = Publisher()
        message_id = publisher.publish("case_files.copy_requested", {"case_id": 1})
        publisher.close()
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._backend: SyncBackend = PikaBackend(self.settings)
        self._published = 0

    @classmethod
    def _sending_to(cls, backend: SyncBackend, settings: Settings | None = None) -> Publisher:
        """A publisher whose messages go to `backend` (the memory broker's, in tests)."""
        publisher = cls(settings)
        publisher._backend = backend
        return publisher

    def __repr__(self) -> str:
        return f"<Publisher {self._backend.describe()} published={self._published}>"

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
    ) -> str:
        """Publish an encoded body and wait for the confirm; returns the message id."""
        codec.check_size(body, self.settings.max_body_bytes)
        message = _outgoing.new(body, headers)
        self._backend.send(exchange, routing_key, message)
        self._published += 1
        return message.message_id

    def close(self) -> None:
        """Close every thread's connection. The publisher re-opens them if used again."""
        self._backend.close()


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
