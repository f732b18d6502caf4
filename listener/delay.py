"""Exact delays held by the broker: when a message is due, and the route that holds it.

Each listener has `LEVELS` delay queues, `<queue>.delay.00` to `<queue>.delay.25`; level n
holds every message for `STEP * 2**n` seconds (its queue TTL), then dead-letters it to the
next level's exchange. A delay is rounded *up* to whole steps, and its step count, written in
binary, says which levels the message waits in: 7 s is 56 steps, `111000`, so it waits 4 s,
2 s and 1 s and skips the other levels. Every message in one level queue waits the same
time, so none ever waits behind a later one, and nothing but the broker holds it.

The bits travel as a routing key of `LEVELS` words, highest level first (for 7 s, twenty
`0` words and then `1.1.1.0.0.0`), in the message's `CC` header: RabbitMQ routes a message
by its CC keys too, and dead-letters it with all of them. Level n's exchange sends a
message whose bit n is 1 to its queue and one whose bit is 0 straight on to level n-1;
after level 0 the message goes to the listener's queue by name (so never to another
listener bound to the same key).

Per listener, rather than one set shared by the whole broker: so `status` can count
each listener's delayed messages, a delayed message reaches exactly its listener's queue,
and deleting a listener's queues deletes what waits for it. The price is 26 quorum queues
per listener, declared with the rest of its topology (about 0.4 s the first time).

    STEP = 0.125 s: never early; late by under one step, plus about 2.5 ms per level waited
    in (measured on RabbitMQ 3.10), plus the broker's and the consumer's own latency.
    MAX_DELAY = (2**26 - 1) * STEP, about 97 days; the top level's TTL, 2**25 * 125 ms,
    stays within the 32-bit TTL RabbitMQ's timers take.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DUE_HEADER",
    "ENTRY_EXCHANGE",
    "LEVELS",
    "MAX_DELAY",
    "ROUTE_HEADER",
    "STEP",
    "Hop",
    "address_route",
    "bits_key",
    "due_headers",
    "first_hop",
    "level_name",
    "relay_route",
    "route_headers",
    "routed_delay",
    "seconds_until",
    "steps",
]

STEP = 0.125
LEVELS = 26
MAX_DELAY = (2**LEVELS - 1) * STEP
#: `listener.publish(address, delay=...)` enters here: every listener bound to the address
#: has its top level bound to this exchange, so each gets its own copy, as a plain publish.
ENTRY_EXCHANGE = "amqp-listener.delay"
#: The header that carries the bits (RabbitMQ's sender-selected routing keys).
ROUTE_HEADER = "CC"
#: When the message is due, ISO 8601 UTC: for the handler and for operators.
DUE_HEADER = "x-due-at"
#: An `at=` this little in the past is taken as "now": the caller's clock read a moment ago.
_PAST_TOLERANCE = 1.0


def seconds_until(
    *,
    delay: float | dt.timedelta | None = None,
    at: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> float:
    """Seconds from `now` until the message is due: `delay` (seconds or a timedelta), or
    until `at` (0 for neither).

    Raises:
        ValueError: both given, a negative or too long delay, a naive `at`, an `at` in the
            past.
    """
    if delay is not None and at is not None:
        raise ValueError("pass delay= or at=, not both")
    if at is not None:
        if not isinstance(at, dt.datetime):
            raise ValueError(f"at= must be a datetime, got {type(at).__name__}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(
                f"at={at.isoformat()} has no time zone: pass an aware datetime, such as "
                "datetime.now(timezone.utc) + timedelta(minutes=10)"
            )
        now = now or dt.datetime.now(dt.UTC)
        delay = (at - now).total_seconds()
        if delay < -_PAST_TOLERANCE:
            raise ValueError(f"at={at.isoformat()} is in the past (now is {now.isoformat()})")
        delay = max(delay, 0.0)
    if delay is None:
        return 0.0
    if isinstance(delay, dt.timedelta):
        delay = delay.total_seconds()
    if isinstance(delay, bool) or not isinstance(delay, int | float) or math.isnan(delay):
        raise ValueError(f"delay= must be a number of seconds, got {delay!r}")
    if delay < 0:
        raise ValueError(f"delay={delay!r} is negative: pass 0 for now, or a later time")
    if delay > MAX_DELAY:
        raise ValueError(
            f"delay={delay!r} s is longer than the longest the broker can hold a message, "
            f"{MAX_DELAY:.0f} s (about {MAX_DELAY / 86400:.0f} days)"
        )
    return float(delay)


def steps(seconds: float) -> int:
    """`seconds` rounded up to whole steps (never early). A hair over a whole step from float
    arithmetic (0.1 + 0.2) does not cost a whole extra step."""
    return max(0, math.ceil(round(seconds / STEP, 6)))


def bits_key(count: int) -> str:
    """The routing key of a `count`-step delay: one word per level, highest first."""
    if not 0 <= count < 2**LEVELS:
        raise ValueError(f"{count} steps is outside 0..{2**LEVELS - 1}")
    return ".".join(format(count, f"0{LEVELS}b"))


def level_name(queue: str, level: int) -> str:
    """`file_copier.delay.07`: both the level's queue and its exchange."""
    return f"{queue}.delay.{level:02d}"


@dataclass(frozen=True, slots=True)
class Hop:
    """Where a delayed message is first published: a level queue, by name, with the bits."""

    queue: str
    headers: dict[str, Any]
    seconds: float


def first_hop(queue: str, seconds: float) -> Hop | None:
    """The first level queue of a `seconds` delay to `queue`, the headers that route it
    from there, and the delay it really gets; None when it rounds to no delay at all."""
    count = steps(seconds)
    if count == 0:
        return None
    return Hop(
        queue=level_name(queue, count.bit_length() - 1),
        headers=route_headers(count),
        seconds=count * STEP,
    )


def address_route(
    exchange: str, routing_key: str, headers: dict[str, Any] | None, seconds: float
) -> tuple[str, str, dict[str, Any] | None]:
    """Exchange, key and headers that deliver a message published to `exchange.routing_key`
    after `seconds` to every listener bound there (each gets its own delayed copy)."""
    count = steps(seconds)
    if count == 0:
        return exchange, routing_key, headers
    return (
        ENTRY_EXCHANGE,
        address_key(exchange, routing_key),
        {
            **(headers or {}),
            **route_headers(count),
        },
    )


def due_headers(
    headers: dict[str, Any] | None,
    *,
    delay: float | dt.timedelta | None,
    at: dt.datetime | None,
) -> dict[str, Any] | None:
    """`headers` with the moment the message is due, for a message written to the outbox:
    the relay routes it through the levels when it publishes (`relay_route`). Unchanged
    when there is no delay.

    Raises:
        ValueError: as `seconds_until`.
    """
    seconds = seconds_until(delay=delay, at=at)
    if steps(seconds) == 0:
        return headers
    due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return {**(headers or {}), DUE_HEADER: due.isoformat()}


def relay_route(
    exchange: str,
    routing_key: str,
    headers: dict[str, Any] | None,
    now: dt.datetime | None = None,
) -> tuple[str, str, dict[str, Any] | None]:
    """Where the outbox relay publishes a row: as written, or, for a row due later and not
    routed yet, through the delay levels for the time still left, so that the message waits
    from the commit and not from the relay's turn. A row written for one listener (the
    default exchange, its queue by name) goes to that listener's levels; one written for an
    address, to every listener bound there."""
    if not headers or DUE_HEADER not in headers or ROUTE_HEADER in headers:
        return exchange, routing_key, headers
    try:
        due = dt.datetime.fromisoformat(str(headers[DUE_HEADER]))
    except ValueError:
        return exchange, routing_key, headers
    remaining = max(0.0, (due - (now or dt.datetime.now(dt.UTC))).total_seconds())
    if exchange:
        return address_route(exchange, routing_key, headers, remaining)
    hop = first_hop(routing_key, remaining)
    if hop is None:
        return exchange, routing_key, headers
    return exchange, hop.queue, {**headers, **hop.headers}


def route_headers(count: int, now: dt.datetime | None = None) -> dict[str, Any]:
    """The headers that route a `count`-step delay through the levels, and say when the
    message is due (`now` + the delay; default: now)."""
    due = (now or dt.datetime.now(dt.UTC)) + dt.timedelta(seconds=count * STEP)
    return {ROUTE_HEADER: [bits_key(count)], DUE_HEADER: due.isoformat()}


def address_key(exchange: str, routing_key: str) -> str:
    """The key a delayed `publish(address)` enters `ENTRY_EXCHANGE` with."""
    return f"x.{exchange}.{routing_key}"


def routed_delay(headers: dict[str, Any] | None) -> float | None:
    """The delay a message's route header holds, in seconds; None for no route."""
    keys = (headers or {}).get(ROUTE_HEADER)
    if not isinstance(keys, list):
        return None
    for key in keys:
        words = key.split(".") if isinstance(key, str) else []
        if len(words) == LEVELS and set(words) <= {"0", "1"}:
            return int("".join(words), 2) * STEP
    return None
