"""Exact delays held by the broker: when a message is due, and the route that holds it.

One set of `LEVELS` delay levels serves every listener on a virtual host:
`amqp-listener.delay.00` to `amqp-listener.delay.25`, each a queue and an exchange. Level n
holds every message for `STEP * 2**n` seconds (its queue TTL), then dead-letters it to the
next level's exchange. A delay is rounded *up* to whole steps, and its step count, written in
binary, says which levels the message waits in: 7 s is 56 steps, `111000`, so it waits 4 s,
2 s and 1 s and skips the other levels. Every message in one level queue waits the same
time, so none ever waits behind a later one, and nothing but the broker holds it.

A delayed message carries two routing keys (the second in its `CC` header: RabbitMQ routes
by CC keys too, and dead-letters a message with all of them):
* the *bits*, `d.` and one word per level, highest first (for 7 s, twenty `0` words, then
  `1.1.1.0.0.0`). Level n's exchange sends a message whose bit n is 1 to its queue and one
  whose bit is 0 straight on to level n-1's exchange; below level 0 lies `OUT_EXCHANGE`.
* where it goes: `amqp-listener.to.<queue>` for one listener (`notify(delay=...)`,
  `Retry(delay=...)`), `x.<exchange>.<routing key>` for every listener bound to an address
  (`listener.publish(address, delay=...)`). Each listener binds its queue to `OUT_EXCHANGE`
  with both keys, and `ENTRY_EXCHANGE` to the top level with the same two, so a delayed
  publish nobody would receive is refused at once (`Unroutable`), as a plain one is.
The key sets never overlap: the bits alone have a first word `d` and `LEVELS + 1` words.

Shared, rather than a set per listener: a quorum queue costs the broker a Raft member and
about three file handles of its own, and 26 per listener exhausted a stock broker's 1,024
handles at ten listeners. A message that reaches `OUT_EXCHANGE` after its listener's queue
was deleted goes to `UNROUTED` (its alternate exchange), where `status` counts it, rather
than stalling the broker's dead-letter worker.

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
    "OUT_EXCHANGE",
    "ROUTE_HEADER",
    "STEP",
    "UNROUTED",
    "Hop",
    "address_key",
    "address_route",
    "bits_key",
    "bits_pattern",
    "due_headers",
    "first_hop",
    "level_name",
    "queue_route",
    "relay_route",
    "route_headers",
    "routed_delay",
    "routed_destination",
    "routed_target",
    "seconds_until",
    "steps",
    "target_key",
]

STEP = 0.125
LEVELS = 26
MAX_DELAY = (2**LEVELS - 1) * STEP
#: Delayed publishes enter here; each listener binds it to the top level with its two keys.
ENTRY_EXCHANGE = "amqp-listener.delay"
#: Below level 0: each listener's queue is bound here with its two keys.
OUT_EXCHANGE = "amqp-listener.delay.out"
#: `OUT_EXCHANGE`'s alternate exchange (fanout) and its queue: messages whose listener's queue
#: is gone by the time they are due.
UNROUTED = "amqp-listener.delay.unrouted"
#: The first word of a bits key.
_BITS_WORD = "d"
#: The prefix of the key that names one listener's queue.
_TARGET_PREFIX = "amqp-listener.to."
#: The prefix of the key a delayed `publish(address)` travels with.
_ADDRESS_PREFIX = "x."
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
    """The routing key of a `count`-step delay: `d`, then one word per level, highest
    first."""
    if not 0 <= count < 2**LEVELS:
        raise ValueError(f"{count} steps is outside 0..{2**LEVELS - 1}")
    return ".".join((_BITS_WORD, *format(count, f"0{LEVELS}b")))


def bits_pattern(level: int, bit: str) -> str:
    """The binding key that matches every bits key whose bit `level` is `bit`, and nothing
    else: exactly `LEVELS + 1` words, the first `d`."""
    words = ["*"] * LEVELS
    words[LEVELS - 1 - level] = bit
    return ".".join((_BITS_WORD, *words))


def level_name(level: int) -> str:
    """`amqp-listener.delay.07`: both the level's queue and its exchange."""
    return f"{ENTRY_EXCHANGE}.{level:02d}"


def target_key(queue: str) -> str:
    """The key a message delayed for listener queue `queue` travels with."""
    return f"{_TARGET_PREFIX}{queue}"


@dataclass(frozen=True, slots=True)
class Hop:
    """Where a delayed message is first published: a level queue, by name, with the bits."""

    queue: str
    headers: dict[str, Any]
    seconds: float


def first_hop(queue: str, seconds: float) -> Hop | None:
    """The first level queue of a `seconds` delay to listener queue `queue` (published to
    by name), the headers that route it from there, and the delay it really gets; None when
    it rounds to no delay at all."""
    count = steps(seconds)
    if count == 0:
        return None
    return Hop(
        queue=level_name(count.bit_length() - 1),
        headers=route_headers(count, target_key(queue)),
        seconds=count * STEP,
    )


def queue_route(
    queue: str, headers: dict[str, Any] | None, seconds: float
) -> tuple[str, str, dict[str, Any] | None] | None:
    """Exchange, key and headers that deliver a message to listener queue `queue` after
    `seconds`, through `ENTRY_EXCHANGE`: refused as unroutable, as a publish, when that
    listener's topology was never declared. None when it rounds to no delay at all."""
    count = steps(seconds)
    if count == 0:
        return None
    return ENTRY_EXCHANGE, target_key(queue), {**(headers or {}), **route_headers(count)}


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
    return queue_route(routing_key, headers, remaining) or (exchange, routing_key, headers)


def route_headers(count: int, *keys: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """The headers that route a `count`-step delay through the levels (the bits, then
    `keys`: where the message goes after them), and say when it is due (`now` + the delay;
    default: now)."""
    due = (now or dt.datetime.now(dt.UTC)) + dt.timedelta(seconds=count * STEP)
    return {ROUTE_HEADER: [bits_key(count), *keys], DUE_HEADER: due.isoformat()}


def address_key(exchange: str, routing_key: str) -> str:
    """The key a delayed `publish(address)` enters `ENTRY_EXCHANGE` with."""
    return f"{_ADDRESS_PREFIX}{exchange}.{routing_key}"


def routed_delay(headers: dict[str, Any] | None) -> float | None:
    """The delay a message's route header holds, in seconds; None for no route."""
    keys = (headers or {}).get(ROUTE_HEADER)
    if not isinstance(keys, list):
        return None
    for key in keys:
        words = key.split(".") if isinstance(key, str) else []
        if len(words) == LEVELS + 1 and words[0] == _BITS_WORD and set(words[1:]) <= {"0", "1"}:
            return int("".join(words[1:]), 2) * STEP
    return None


def routed_target(headers: dict[str, Any] | None) -> str | None:
    """The listener queue a delayed message's route names, if it names one."""
    keys = (headers or {}).get(ROUTE_HEADER)
    if not isinstance(keys, list):
        return None
    for key in keys:
        if isinstance(key, str) and key.startswith(_TARGET_PREFIX):
            return key[len(_TARGET_PREFIX) :]
    return None


def routed_destination(headers: dict[str, Any] | None) -> tuple[str, str] | None:
    """Where a delayed message goes once due, as an exchange and a routing key: a listener's
    queue by name on the default exchange, or the address it was published to; None when
    its route names neither (not a delayed message).

    Read from its `CC` keys and, for a message the levels dead-lettered, from the routing
    keys the broker recorded in `x-death` (a delayed `notify()` enters with its destination
    as its routing key, not in `CC`)."""
    for key in _route_keys(headers or {}):
        if key.startswith(_TARGET_PREFIX):
            return "", key[len(_TARGET_PREFIX) :]
        if key.startswith(_ADDRESS_PREFIX):
            # Exchange names hold no dots (listener.routing), so the first one ends it.
            exchange, dot, routing_key = key[len(_ADDRESS_PREFIX) :].partition(".")
            if dot and exchange and routing_key:
                return exchange, routing_key
    return None


def _route_keys(headers: dict[str, Any]) -> list[str]:
    keys = headers.get(ROUTE_HEADER)
    found = [key for key in keys if isinstance(key, str)] if isinstance(keys, list) else []
    deaths = headers.get("x-death")
    for death in deaths if isinstance(deaths, list) else ():
        recorded = death.get("routing-keys") if isinstance(death, dict) else None
        if isinstance(recorded, list):
            found.extend(key for key in recorded if isinstance(key, str))
    return found
