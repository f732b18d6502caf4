"""The pure half of settling one delivery: its attempt number, its Failure, the copy's headers.

`listener.outcome.decide` says what happens to a delivery; this module holds the other
decisions around it that do no I/O: which attempt a delivery is, how an exception from
`handle()` becomes a `Failure`, and which headers the retried or parked copy carries. The
in-memory broker of `listener.testing` settles with exactly these, so that its parked
messages look like the runner's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
from collections.abc import Mapping
from typing import Any

from listener import delay, outcome
from listener.codec import DecodeFailure
from listener.errors import Reject, Retry
from listener.outcome import Failure, Park, RetryLater

__all__ = [
    "attempt_number",
    "carried_headers",
    "check_sync_result",
    "copy_headers",
    "decode_failure",
    "failure_from",
    "timeout_failure",
]

#: A delayed message's route and due time: a copy (retry or park) gets its own, or none.
_DELAY_HEADERS = frozenset({delay.ROUTE_HEADER, delay.DUE_HEADER})


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
    done = outcome.attempts_made(headers) if outcome.ATTEMPTS_HEADER in headers else 0
    if deaths and done + deaths >= max_attempts:
        return done + deaths, Failure(
            "lost",
            "listener.WorkerLost",
            f"its worker died {deaths} time(s) while this message was the only one running",
        )
    if delivery_limit is not None and "x-delivery-count" in headers:
        unsettled = outcome.deliveries_lost(headers)
        if unsettled >= delivery_limit:
            return done + deaths + 1, Failure(
                "undelivered",
                "listener.DeliveryLimit",
                f"delivered {unsettled} time(s) without an outcome (its worker or its "
                f"connection was lost each time); parked at the delivery limit "
                f"max_deliveries={delivery_limit}",
            )
    return done + deaths + 1, None


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


def check_sync_result(result: Any) -> None:
    """Refuse an awaitable returned by a sync `handle()` (an async handler in disguise).

    Nothing would ever run it, so the attempt must not count as done.

    Raises:
        TypeError: `result` is awaitable (it is closed first).
    """
    if not inspect.isawaitable(result):
        return
    close = getattr(result, "close", None)
    if close is not None:
        # Closing is a courtesy; the TypeError below is what matters.
        with contextlib.suppress(Exception):
            close()
    raise TypeError(
        "handle() returned an awaitable: it is async but does not look it (a "
        "decorator without functools.wraps?); declare it with async def"
    )


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
        if k not in outcome.BROKER_HEADERS and k not in _DELAY_HEADERS
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
    failed, how and where, plus the park reason."""
    headers = dict(carried)
    headers.update(
        outcome.failure_headers(
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
    return headers
