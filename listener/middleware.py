"""Middleware: objects whose hooks the worker calls around every delivery.

Every hook of `Middleware` does nothing; subclass it and override the ones you need.
`on_worker_start` and `before_handle` run in the order middleware was added, the others in
the reverse order, so that the first middleware wraps all the rest. A hook that raises is
logged and skipped: it never changes a message's outcome.

    class Audit(listener.Middleware):
        def after_handle(self, delivery, *, outcome, failure, duration):
            audit_log.write(delivery.listener.__name__, delivery.message_id, outcome)

    listener.add_middleware(Audit())     # in a module the runner imports

Hooks run on the worker's event loop: keep them quick and never block. The outcome log
line is itself middleware (`OutcomeLog`), added first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.outcome import Failure
    from listener.runner.worker import Worker

__all__ = ["Delivery", "Middleware", "OutcomeLog", "add_middleware", "installed_middleware"]

log = logging.getLogger("listener.middleware")


@dataclass(slots=True)
class Delivery:
    """One delivery, as middleware sees it. `state` is free for middleware to use between
    its hooks (a timer, a tracing span)."""

    listener: type[Listener]
    message_id: str
    attempt: int
    headers: Mapping[str, Any]
    exchange: str
    routing_key: str
    redelivered: bool
    started: float = field(default_factory=time.monotonic)
    state: dict[str, Any] = field(default_factory=dict)
    #: The decoded message, once decoded (None before, and when it could not be).
    message: Any = None


class Middleware:
    """Base class: every hook does nothing."""

    def on_worker_start(self, worker: Worker) -> None:
        """Called once the worker consumes (again after each reconnect)."""

    def on_worker_stop(self, worker: Worker) -> None:
        """Called when the worker has drained and is about to exit."""

    def before_handle(self, delivery: Delivery) -> None:
        """Called before the body is decoded and `handle()` runs."""

    def after_handle(
        self, delivery: Delivery, *, outcome: str, failure: Failure | None, duration: float
    ) -> None:
        """Called once the delivery's fate is settled.

        `outcome` is `handled`, `retried`, `parked`, or `returned` (handed back unsettled:
        the worker stopped, or the broker refused a move).
        """

    def on_retry(self, delivery: Delivery, *, delay: float, failure: Failure) -> None:
        """Called when a failed attempt was moved to a delay queue."""

    def on_park(self, delivery: Delivery, *, reason: str, failure: Failure) -> None:
        """Called when a message was moved to its dead-letter queue."""


class OutcomeLog(Middleware):
    """One log line per outcome: handled at DEBUG (the hot path stays quiet at INFO),
    retried at WARNING, parked at ERROR. Fields are also passed as `extra` for JSON logs;
    the body is never logged."""

    logger = logging.getLogger("listener.outcome")

    def on_retry(self, delivery: Delivery, *, delay: float, failure: Failure) -> None:
        delivery.state["outcome_log.next"] = f"retry in {delay:g}s"

    def on_park(self, delivery: Delivery, *, reason: str, failure: Failure) -> None:
        delivery.state["outcome_log.next"] = f"parked ({reason})"

    def after_handle(
        self, delivery: Delivery, *, outcome: str, failure: Failure | None, duration: float
    ) -> None:
        level = _LEVELS.get(outcome, logging.INFO)
        if not self.logger.isEnabledFor(level):
            return
        fields = {
            "listener": delivery.listener.__name__,
            "message_id": delivery.message_id,
            "attempt": delivery.attempt,
            "duration_ms": round(duration * 1000, 1),
            "outcome": outcome,
            "exception_type": failure.exception_type if failure else None,
        }
        if failure is None:
            self.logger.log(
                level,
                "%s: message %s attempt %d %s in %.1f ms",
                fields["listener"],
                delivery.message_id,
                delivery.attempt,
                outcome,
                fields["duration_ms"],
                extra=fields,
            )
            return
        self.logger.log(
            level,
            "%s: message %s attempt %d failed with %s: %s -> %s",
            fields["listener"],
            delivery.message_id,
            delivery.attempt,
            failure.exception_type,
            failure.message,
            delivery.state.get("outcome_log.next", outcome),
            extra=fields,
        )


_LEVELS = {"handled": logging.DEBUG, "retried": logging.WARNING, "parked": logging.ERROR}

_installed: list[Middleware] = []


def add_middleware(middleware: Middleware) -> None:
    """Install `middleware` for every worker started in this process from now on."""
    if not isinstance(middleware, Middleware):
        raise TypeError(f"{middleware!r} is not a listener.Middleware")
    _installed.append(middleware)


def installed_middleware() -> list[Middleware]:
    """The middleware a new worker runs: `OutcomeLog` first, the ledger's recorder when a
    database is configured, then what was added."""
    from listener.recording import ledger_middleware

    return [OutcomeLog(), *ledger_middleware(), *_installed]


class Chain:
    """Calls one hook on every middleware, in order or reversed, logging crashes."""

    __slots__ = ("_forward", "_reverse")

    def __init__(self, middleware: Iterable[Middleware]) -> None:
        self._forward = list(middleware)
        self._reverse = list(reversed(self._forward))

    def before(self, hook: str, *args: Any, **kwargs: Any) -> None:
        self._emit(self._forward, hook, args, kwargs)

    def after(self, hook: str, *args: Any, **kwargs: Any) -> None:
        self._emit(self._reverse, hook, args, kwargs)

    @staticmethod
    def _emit(
        chain: list[Middleware], hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        for middleware in chain:
            try:
                getattr(middleware, hook)(*args, **kwargs)
            except Exception:
                log.exception("%s.%s failed; ignored", type(middleware).__name__, hook)
