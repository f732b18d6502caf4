"""A parked message as an operator sees it, read from the failure headers the framework
writes when it parks one, and the records the operator commands hand back: a page of a
listing, and what a replay or purge did.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any

from listener._outgoing import KEPT_PROPERTIES

__all__ = ["Page", "Parked", "ReplayResult", "SortKey", "sort_key"]

REPLAYS_HEADER = "x-replays"


#: Oldest first: (has no parking time, parking time, message id). A message with no known
#: parking time goes last, not first; the id breaks ties so that pages never overlap.
SortKey = tuple[int, str, str]


@dataclass(frozen=True, slots=True)
class Parked:
    """A parked message, as read from the dead-letter queue."""

    message_id: str
    reason: str
    attempts: int | None
    exception_type: str
    exception_message: str
    listener: str
    parked_at: str
    first_failure_at: str
    host: str
    pid: int | None
    peeks: int
    replays: int
    headers: dict[str, Any] = field(repr=False)
    properties: dict[str, Any] = field(repr=False)
    body: bytes = field(repr=False)

    @classmethod
    def read(cls, properties: Any, body: bytes) -> Parked:
        """Build from a delivery's properties (pika's `BasicProperties`) and body."""
        headers = dict(properties.headers or {})
        kept = {
            name: getattr(properties, name)
            for name in KEPT_PROPERTIES
            if getattr(properties, name) is not None
        }
        return cls(
            message_id=str(properties.message_id or ""),
            reason=_text(headers.get("x-parked-reason")) or _broker_reason(headers),
            attempts=_int(headers.get("x-attempts")),
            exception_type=_text(headers.get("x-exception-type")),
            exception_message=_text(headers.get("x-exception-message")),
            listener=_text(headers.get("x-listener")),
            parked_at=(
                _text(headers.get("x-last-failure-at"))
                or _death_time(headers)
                or _stamp(properties.timestamp)
            ),
            first_failure_at=_text(headers.get("x-first-failure-at")),
            host=_text(headers.get("x-host")),
            pid=_int(headers.get("x-pid")),
            peeks=_int(headers.get("x-delivery-count")) or 0,
            replays=_int(headers.get(REPLAYS_HEADER)) or 0,
            headers=headers,
            properties=kept,
            body=body,
        )

    def without_body(self) -> Parked:
        """A copy that holds no body: what a listing keeps in memory."""
        return replace(self, body=b"")

    def summary(self) -> dict[str, Any]:
        """The one-line view (what `dead list` shows)."""
        return {
            "id": self.message_id,
            "parked_at": self.parked_at,
            "attempts": self.attempts,
            "reason": self.reason,
            "exception": self.exception_type,
            "message": self.exception_message,
        }

    def age(self, now: dt.datetime) -> dt.timedelta:
        """How long ago it was parked (zero when the time is unknown)."""
        try:
            when = dt.datetime.fromisoformat(self.parked_at)
        except ValueError:
            return dt.timedelta(0)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return now - when


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, oldest first.

    `total` counts every parked message that matched the filters, `after` included or not;
    `next_after` is the id to pass as `after` for the next page, or None on the last one.
    """

    messages: list[Parked]
    total: int
    next_after: str | None


@dataclass(slots=True)
class ReplayResult:
    """What a replay or purge did: the ids it moved, and the ids asked for but not found."""

    done: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


def sort_key(parked: Parked) -> SortKey:
    """Where `parked` goes in a listing: oldest first."""
    if parked.parked_at:
        return (0, parked.parked_at, parked.message_id)
    return (1, "", parked.message_id)


def _death_time(headers: dict[str, Any]) -> str:
    # Dead-lettered by the broker itself: x-death holds when.
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        when = deaths[0].get("time")
        if isinstance(when, dt.datetime):
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)
            return when.isoformat(timespec="milliseconds")
    return ""


def _broker_reason(headers: dict[str, Any]) -> str:
    # Dead-lettered by RabbitMQ itself (the work queue's delivery-limit backstop).
    reason = _text(headers.get("x-first-death-reason"))
    return f"broker:{reason}" if reason else "unknown"


def _stamp(timestamp: int | None) -> str:
    if not timestamp:
        return ""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value
