"""What goes out: the record of an outgoing message, and the one place that builds it.

Every message the framework sends is an `Outgoing`: `notify()` and `listener.publish()`
(pika), their async twins and batches (aiormq), the runner's retry, park and hand-back
copies, the operator's replays, the outbox relay, and the in-memory broker of the tests.
The functions here decide its id, timestamp, persistence, content type, headers and trace
context; a backend only converts the record to its client's property type
(`listener._pika_backend.pika_properties`, `listener._aiormq_backend.aiormq_properties`,
`listener._memory_publishers`).

The wire format they write (the README's "Wire format"): persistent (`delivery_mode` 2),
`content_type` `application/json`, a `message_id` of 32 hex digits kept through retries,
parking and replays, a `timestamp` in whole seconds.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from listener.codec import CONTENT_TYPE, new_message_id
from listener.tracing import inject_trace_context

__all__ = [
    "KEPT_PROPERTIES",
    "Outgoing",
    "Sending",
    "copy_of",
    "new",
    "relayed",
    "replayed",
    "seconds",
]

#: The properties a copy of a message keeps (a retry, a park, a replay). Not `expiration`
#: (a parked message must not expire; the runner keeps it in a header) and not `user_id`
#: (the broker refuses a user_id other than the publishing connection's own).
KEPT_PROPERTIES = (
    "content_type",
    "content_encoding",
    "priority",
    "correlation_id",
    "reply_to",
    "message_id",
    "timestamp",
    "type",
    "app_id",
)


#: One message of a batch: the exchange and routing key it goes to, the message, and the
#: address its errors name when not that one (an outbox row routed through the delay
#: levels is reported by the address it was written for).
Sending = tuple[str, str, "Outgoing", tuple[str, str] | None]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message on its way out: its body and properties, in no client's types.

    `headers` already holds the trace context, when there is one (`new` puts it there; a
    copy keeps the original's). Properties left None are not sent.
    """

    body: bytes
    message_id: str
    #: Whole seconds since the epoch, as AMQP carries it.
    timestamp: int | None
    headers: dict[str, Any] | None
    content_type: str | None = CONTENT_TYPE
    content_encoding: str | None = None
    #: `delivery_mode` 2: the broker writes the message to disk. Every path sends True.
    persistent: bool = True
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    type: str | None = None
    app_id: str | None = None


def new(body: bytes, headers: Mapping[str, Any] | None = None) -> Outgoing:
    """A message the application publishes now: a fresh id, this second, JSON, persistent,
    `headers` (copied: the caller's dict is never changed) plus the current trace context."""
    return Outgoing(
        body,
        new_message_id(),
        int(time.time()),
        inject_trace_context(dict(headers) if headers else None),
    )


def copy_of(properties: Any, body: bytes, *, message_id: str, headers: dict[str, Any]) -> Outgoing:
    """The copy of a delivery that the runner publishes to retry, park or hand it back.

    It keeps the body and the `KEPT_PROPERTIES` of `properties` (a delivery's, of any
    client) byte for byte, with `message_id` (the delivery's, or the one it was given) and
    `headers` (the runner's, carrying the trace context along).
    """
    return Outgoing(
        body,
        message_id,
        properties.timestamp,
        headers,
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        type=properties.type,
        app_id=properties.app_id,
    )


def replayed(properties: Mapping[str, Any], body: bytes, headers: dict[str, Any]) -> Outgoing:
    """A parked message sent again (or parked again): `properties` are the ones it was read
    with (`Parked.properties`, the `KEPT_PROPERTIES` it had), `headers` the new ones."""
    get = properties.get
    return Outgoing(
        body,
        str(get("message_id") or ""),
        get("timestamp"),
        headers,
        content_type=get("content_type"),
        content_encoding=get("content_encoding"),
        priority=get("priority"),
        correlation_id=get("correlation_id"),
        reply_to=get("reply_to"),
        type=get("type"),
        app_id=get("app_id"),
    )


def relayed(
    body: bytes, message_id: str, created_at: dt.datetime, headers: dict[str, Any] | None
) -> Outgoing:
    """An outbox row the relay publishes: the id and trace context it was written with, and
    the moment it was written as its timestamp."""
    return Outgoing(body, message_id, seconds(created_at), headers)


def seconds(moment: dt.datetime) -> int:
    """`moment` in whole seconds since the epoch; a naive one is taken as UTC (SQLite hands
    back what was stored in UTC without its zone)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp())
