"""The outcome of one attempt, decided by pure code: ack, retry after N seconds, or park.

The runner's consumer executes the decision in exactly one place; nothing here does I/O,
so the contract's outcome table is tested directly against `decide()`.

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

from listener.codec import error_summary

__all__ = [
    "ATTEMPTS_HEADER",
    "BROKER_HEADERS",
    "Ack",
    "Failure",
    "Outcome",
    "Park",
    "RetryLater",
    "attempts_made",
    "decide",
    "delay_before",
    "deliveries_lost",
    "failure_headers",
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


@dataclass(frozen=True, slots=True)
class Ack:
    """The attempt succeeded: acknowledge the delivery."""


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Publish a copy to the delay queue for `delay` seconds (confirmed), then ack."""

    delay: float
    attempts: int


@dataclass(frozen=True, slots=True)
class Park:
    """Publish a copy to `<queue>.dead` with `reason` (confirmed), then ack."""

    reason: str
    attempts: int


Outcome = Ack | RetryLater | Park


def decide(
    failure: Failure | None, *, attempt: int, max_attempts: int, retry_delays: Sequence[float]
) -> Outcome:
    """Map one attempt's result to what happens to the message.

    Args:
        failure: None when `handle` returned.
        attempt: this attempt's number, 1 for the first.
        max_attempts: attempts in all, the first included.
        retry_delays: seconds before attempt 2, 3, ...; the last value repeats.
    """
    if failure is None:
        return Ack()
    if failure.kind == "reject":
        return Park("rejected", attempt)
    if failure.kind == "decode":
        return Park(failure.reason, attempt)
    if failure.kind == "lost":
        return Park("worker_lost", attempt)
    if failure.kind == "undelivered":
        return Park("delivery_limit", attempt)
    if attempt >= max_attempts:
        return Park("timeout" if failure.kind == "timeout" else "failed", attempt)
    if failure.kind == "retry" and failure.delay is not None:
        return RetryLater(failure.delay, attempt)
    return RetryLater(delay_before(attempt + 1, retry_delays), attempt)


def delay_before(attempt: int, retry_delays: Sequence[float]) -> float:
    """Seconds to wait before `attempt` (2 or more); the last delay repeats."""
    if not retry_delays or attempt < 2:
        return 0.0
    return float(retry_delays[min(attempt - 2, len(retry_delays) - 1)])


def attempts_made(headers: Mapping[str, Any] | None) -> int:
    """Failed attempts recorded by the framework before this delivery (forgery-safe)."""
    return _counter(headers, ATTEMPTS_HEADER)


def deliveries_lost(headers: Mapping[str, Any] | None) -> int:
    """Deliveries of this copy that ended without an outcome (quorum `x-delivery-count`):
    a death, a lost connection or a requeue, whoever's fault it was."""
    return _counter(headers, "x-delivery-count")


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
