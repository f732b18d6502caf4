"""The outcome of one attempt, decided by pure code: ack, retry after N seconds, or park.

`decide()` says the whole of it: the outcome, the queue a copy goes to, and the delay the
broker will really hold it for. The rest of settling that does no I/O is here too: which
attempt a delivery is, how an exception from `handle()` becomes a `Failure`, and the headers
of the retried or parked copy. The runner's consumer carries the decision out in exactly
one place (`listener.runner.consumer`, which the in-memory test kit drives as well), so the
contract's outcome table is tested directly against `decide()`.

Two counters meet here. The framework's own `x-attempts` header counts attempts that ended
in a failure the worker saw (an exception, a time-out, `Retry`); it is written on every retry
republish. Worker deaths are counted by blame (`listener.runner.blame`), never by the
broker's `x-delivery-count` (quorum queues), which goes up for every unsettled delivery of a
dead connection, guilty or not: that count only feeds the delivery limit, a backstop.
`x-death` is deliberately not used: its counting changed in RabbitMQ 3.13.
"""

from __future__ import annotations

import datetime as dt
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from listener import delay as _delay
from listener.codec import DecodeFailure, error_summary
from listener.errors import Reject, Retry
from listener.topology import dead_queue_name, delay_queue_name, is_declared_delay

__all__ = [
    "ATTEMPTS_HEADER",
    "BROKER_HEADERS",
    "Ack",
    "Failure",
    "Outcome",
    "Park",
    "RetryLater",
    "attempt_number",
    "attempts_made",
    "carried_headers",
    "copy_headers",
    "decide",
    "decode_failure",
    "delay_before",
    "deliveries_lost",
    "failure_from",
    "failure_headers",
    "timeout_failure",
]

ATTEMPTS_HEADER = "x-attempts"
#: Headers RabbitMQ itself writes (delivery counting, dead-lettering history). Copies the
#: framework makes leave them out: the broker starts them afresh for the copy.
BROKER_HEADERS = frozenset(
    {
        "x-delivery-count",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
#: A delayed message's route and due time: a copy (retry or park) gets its own, or none.
_DELAY_HEADERS = frozenset({_delay.ROUTE_HEADER, _delay.DUE_HEADER})
#: A forged or corrupt attempt header larger than this is read as this: it parks the message
#: early (safe: parked messages can be replayed) and never loops.
_MAX_COUNTER = 1_000_000
_MAX_MESSAGE_CHARS = 1_000
_MAX_TRACEBACK_CHARS = 8_000

FailureKind = Literal["error", "timeout", "retry", "reject", "decode", "lost", "undelivered"]


@dataclass(frozen=True, slots=True)
class Failure:
    """How an attempt failed. `reason` refines `kind` for decode failures and rejects."""

    kind: FailureKind
    exception_type: str
    message: str
    traceback: str = ""
    delay: float | None = None
    reason: str = ""

    @classmethod
    def from_exception(
        cls, kind: FailureKind, exc: BaseException, *, delay: float | None = None, reason: str = ""
    ) -> Failure:
        """Describe `exc`: qualified type, message and traceback (never local variables)."""
        exc_type = type(exc)
        name = exc_type.__qualname__
        if exc_type.__module__ not in ("builtins", "__main__"):
            name = f"{exc_type.__module__}.{name}"
        message = _safe_str(exc)
        text = "".join(_format_chain(exc, set()))
        return cls(kind, name, _clip(message, _MAX_MESSAGE_CHARS), _tail(text), delay, reason)


def failure_from(exc: BaseException) -> Failure:
    """What an exception raised by `handle()` means: a retry, a reject or a failure."""
    if isinstance(exc, Retry):
        return Failure.from_exception("retry", exc, delay=exc.delay)
    if isinstance(exc, Reject):
        return Failure.from_exception("reject", exc, reason=exc.reason)
    return Failure.from_exception("error", exc)


def decode_failure(exc: DecodeFailure) -> Failure:
    """A body that never reached `handle()`: parked at once with `exc.reason`."""
    return Failure("decode", "listener.DecodeFailure", str(exc), reason=exc.reason)


def timeout_failure(detail: str) -> Failure:
    """An attempt that outlived the listener's `timeout`."""
    return Failure("timeout", "TimeoutError", detail)


@dataclass(frozen=True, slots=True)
class Ack:
    """The attempt succeeded: acknowledge the delivery."""


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Publish a copy to `queue` (confirmed), then ack: it is delivered again after `delay`
    seconds. `steps` is the delay in `listener.delay.STEP`s when `queue` is the first of the
    delay levels (the copy carries the route for the rest, back to queue `to`), else 0."""

    delay: float
    attempts: int
    queue: str
    steps: int = 0
    #: With `steps`: the listener queue the delay levels lead the copy back to.
    to: str = ""


@dataclass(frozen=True, slots=True)
class Park:
    """Publish a copy to `queue` (`<queue>.dead`) with `reason` (confirmed), then ack."""

    reason: str
    attempts: int
    queue: str


Outcome = Ack | RetryLater | Park
#: Most attempts succeed: one shared decision rather than a new one each time.
_ACK = Ack()


def decide(
    failure: Failure | None,
    *,
    attempt: int,
    max_attempts: int,
    retry_delays: Sequence[float],
    queue: str,
) -> Outcome:
    """Map one attempt's result to what happens to the message, and where its copy goes.

    Args:
        failure: None when `handle` returned.
        attempt: this attempt's number, 1 for the first.
        max_attempts: attempts in all, the first included.
        retry_delays: seconds before attempt 2, 3, ...; the last value repeats. Each has a
            delay queue of its own; any other delay goes through the delay levels, rounded
            up to whole steps.
        queue: the listener's queue.
    """
    if failure is None:
        return _ACK
    kind = failure.kind
    if kind == "reject":
        reason = "rejected"
    elif kind == "decode":
        reason = failure.reason
    elif kind == "lost":
        reason = "worker_lost"
    elif kind == "undelivered":
        reason = "delivery_limit"
    elif attempt >= max_attempts:
        reason = "timeout" if kind == "timeout" else "failed"
    else:
        if kind == "retry" and failure.delay is not None:
            delay = failure.delay
        else:
            delay = delay_before(attempt + 1, retry_delays)
        if delay > 0 and is_declared_delay(delay, retry_delays):
            return RetryLater(float(delay), attempt, delay_queue_name(queue, delay))
        steps = _delay.steps(delay)
        if steps == 0:
            return RetryLater(0.0, attempt, queue)
        level = _delay.level_name(steps.bit_length() - 1)
        return RetryLater(steps * _delay.STEP, attempt, level, steps, queue)
    return Park(reason, attempt, dead_queue_name(queue))


def delay_before(attempt: int, retry_delays: Sequence[float]) -> float:
    """Seconds to wait before `attempt` (2 or more); the last delay repeats."""
    if not retry_delays or attempt < 2:
        return 0.0
    return float(retry_delays[min(attempt - 2, len(retry_delays) - 1)])


def attempt_number(
    headers: Mapping[str, Any],
    max_attempts: int,
    *,
    deaths: int = 0,
    delivery_limit: int | None = None,
) -> tuple[int, Failure | None]:
    """This delivery's attempt number, and a Failure when no attempt may run.

    Attempts the framework counted (`x-attempts`) plus the worker deaths blamed on this
    message (`deaths`, see `listener.runner.blame`). A message whose blamed deaths used up
    `max_attempts` is parked as it stands (`lost`). So is one delivered `delivery_limit`
    times without an outcome (`x-delivery-count`, the backstop for deaths blame cannot see):
    the broker raises that count for every unsettled delivery of a dead connection, so it
    is never read as a count of deaths.
    """
    # Most deliveries carry neither counter: looked up before any call is made.
    done = attempts_made(headers) if ATTEMPTS_HEADER in headers else 0
    if deaths and done + deaths >= max_attempts:
        return done + deaths, Failure(
            "lost",
            "listener.WorkerLost",
            f"its worker died {deaths} time(s) while this message was the only one running",
        )
    if delivery_limit is not None and "x-delivery-count" in headers:
        unsettled = deliveries_lost(headers)
        if unsettled >= delivery_limit:
            return done + deaths + 1, Failure(
                "undelivered",
                "listener.DeliveryLimit",
                f"delivered {unsettled} time(s) without an outcome (its worker or its "
                f"connection was lost each time); parked at the delivery limit "
                f"max_deliveries={delivery_limit}",
            )
    return done + deaths + 1, None


def attempts_made(headers: Mapping[str, Any] | None) -> int:
    """Failed attempts recorded by the framework before this delivery (forgery-safe)."""
    return _counter(headers, ATTEMPTS_HEADER)


def deliveries_lost(headers: Mapping[str, Any] | None) -> int:
    """Deliveries of this copy that ended without an outcome (quorum `x-delivery-count`):
    a death, a lost connection or a requeue, whoever's fault it was."""
    return _counter(headers, "x-delivery-count")


def carried_headers(
    headers: Mapping[str, Any] | None,
    *,
    exchange: str,
    routing_key: str,
    expiration: str | None = None,
) -> dict[str, Any]:
    """The headers a copy of a delivery keeps: all but the broker's own, plus where the
    message was first published (kept from the first copy on)."""
    carried = {
        k: v
        for k, v in (headers or {}).items()
        if k not in BROKER_HEADERS and k not in _DELAY_HEADERS
    }
    carried.setdefault("x-original-exchange", exchange)
    carried.setdefault("x-original-routing-key", routing_key)
    if expiration is not None:
        carried.setdefault("x-original-expiration", str(expiration))
    return carried


def copy_headers(
    decision: RetryLater | Park,
    failure: Failure,
    *,
    carried: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
    listener: str,
    host: str,
    pid: int,
    now: dt.datetime,
) -> dict[str, Any]:
    """Every header of the copy moved to a delay queue or parked: `carried` plus what
    failed, how and where, plus the park reason or the route through the delay levels."""
    headers = dict(carried)
    headers.update(
        failure_headers(
            failure,
            attempts=decision.attempts,
            previous=previous,
            listener=listener,
            host=host,
            pid=pid,
            now=now,
        )
    )
    if isinstance(decision, Park):
        headers["x-parked-reason"] = decision.reason
        if failure.reason and failure.kind == "reject":
            headers["x-exception-message"] = failure.reason
    elif decision.steps:
        headers.update(
            _delay.route_headers(decision.steps, _delay.target_key(decision.to), now=now)
        )
    return headers


def failure_headers(
    failure: Failure,
    *,
    attempts: int,
    previous: Mapping[str, Any] | None,
    listener: str,
    host: str,
    pid: int,
    now: dt.datetime,
) -> dict[str, Any]:
    """Headers that say what failed, how and where; written on retries and when parking."""
    stamp = now.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    first = (previous or {}).get("x-first-failure-at")
    headers: dict[str, Any] = {
        ATTEMPTS_HEADER: attempts,
        "x-exception-type": failure.exception_type,
        "x-exception-message": failure.message,
        "x-listener": listener,
        "x-host": host,
        "x-pid": pid,
        "x-first-failure-at": first if isinstance(first, str) else stamp,
        "x-last-failure-at": stamp,
    }
    if failure.traceback:
        headers["x-exception-traceback"] = failure.traceback
    return headers


def _safe_str(exc: BaseException) -> str:
    if isinstance(exc, pydantic.ValidationError):
        # Its str() repeats the input values, which may be secrets: keep locations only.
        return error_summary(exc)
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not break the failure path
        return f"<{type(exc).__name__} whose str() failed>"


def _format_chain(exc: BaseException, seen: set[int]) -> list[str]:
    """Like traceback.format_exception, with every message made safe by `_safe_str`."""
    seen.add(id(exc))
    parts: list[str] = []
    if exc.__cause__ is not None and id(exc.__cause__) not in seen:
        parts += _format_chain(exc.__cause__, seen)
        parts.append("\nThe above exception was the direct cause of the following exception:\n\n")
    elif (
        exc.__context__ is not None
        and not exc.__suppress_context__
        and id(exc.__context__) not in seen
    ):
        parts += _format_chain(exc.__context__, seen)
        parts.append("\nDuring handling of the above exception, another exception occurred:\n\n")
    if exc.__traceback__ is not None:
        parts.append("Traceback (most recent call last):\n")
        parts += traceback.format_tb(exc.__traceback__)
    parts.append(f"{type(exc).__module__}.{type(exc).__qualname__}: {_safe_str(exc)}\n")
    return parts


def _counter(headers: Mapping[str, Any] | None, name: str) -> int:
    value = (headers or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return min(value, _MAX_COUNTER)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tail(text: str) -> str:
    # Keep the end: the innermost frames and the exception line say the most.
    if len(text) <= _MAX_TRACEBACK_CHARS:
        return text
    return "...\n" + text[-(_MAX_TRACEBACK_CHARS - 4) :]
