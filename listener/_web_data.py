"""What the web console shows, and where it comes from.

* The broker (`BrokerSource`): queue counts, parked messages, replay and purge, through
  the operator commands (`listener.operations`), so the console behaves as the CLI does.
  Counts are cached: however many tabs poll, the broker is asked about each listener at
  most once per `ttl` seconds.
* The job ledger (`JobSource`): workers and jobs. A small interface, so that a ledger
  reader can fill those pages; until one is configured, `NoLedger` says what is missing.

Every call here is synchronous (pika); the app runs them in a worker thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from listener.errors import ConfigurationError
from listener.listener import Listener
from listener.operations import Operator, QueueStatus, Target
from listener.parked import Page, Parked, ReplayResult
from listener.settings import Settings

__all__ = ["BrokerSource", "JobSource", "NoLedger", "TopologyRow", "job_source"]

#: Seconds the overview's counts are reused: the idle cost promised to the broker.
OVERVIEW_TTL = 5.0


@dataclass(frozen=True, slots=True)
class TopologyRow:
    """One listener's path through the broker: exchange -> queue -> delay queues -> dead."""

    listener: str
    exchange: str
    binding_key: str
    queue: str
    delays: tuple[str, ...]
    dead: str


class BrokerSource:
    """The console's view of RabbitMQ, for the listeners given (or, without any, the
    listener queues the management API shows)."""

    def __init__(
        self,
        settings: Settings,
        listeners: Sequence[type[Listener]] | None,
        *,
        ttl: float = OVERVIEW_TTL,
    ) -> None:
        self.settings = settings
        self.listeners = list(listeners) if listeners else None
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, list[QueueStatus]] | None = None
        self.queries = 0  # how many times the broker was asked (tests read it)

    def overview(self) -> tuple[list[QueueStatus], float]:
        """Every listener's counts, and how old they are in seconds."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.ttl:
                with Operator(self.settings) as operator:
                    rows = operator.status(self.listeners)
                self.queries += 1
                self._cached = (time.monotonic(), rows)
            taken, rows = self._cached
            return rows, time.monotonic() - taken

    def forget(self) -> None:
        """Drop the cached counts (after an action changed them)."""
        with self._lock:
            self._cached = None

    def queues(self) -> list[str]:
        """The listener queues the console may act on."""
        if self.listeners is not None:
            return [cls.queue for cls in self.listeners]
        rows, _ = self.overview()
        return [row.queue for row in rows]

    def page(self, queue: str, *, limit: int, after: str | None) -> tuple[Target, Page]:
        with Operator(self.settings) as operator:
            target = self._target(operator, queue)
            return target, operator.page(target, limit=limit, after=after)

    def find(self, queue: str, message_id: str) -> Parked | None:
        with Operator(self.settings) as operator:
            return operator.find(self._target(operator, queue), message_id)

    def replay(self, queue: str, ids: Sequence[str]) -> ReplayResult:
        try:
            with Operator(self.settings) as operator:
                return operator.replay(self._target(operator, queue), ids=ids)
        finally:
            self.forget()

    def purge(self, queue: str, ids: Sequence[str]) -> ReplayResult:
        try:
            with Operator(self.settings) as operator:
                return operator.purge(self._target(operator, queue), ids=ids)
        finally:
            self.forget()

    def topology(self) -> list[TopologyRow]:
        """The declared path of each listener given by module (none without modules)."""
        rows = []
        for cls in self.listeners or []:
            declared = cls.topology(self.settings)
            rows.append(
                TopologyRow(
                    listener=cls.name(),
                    exchange=declared.exchange,
                    binding_key=declared.binding_key,
                    queue=declared.queue.name,
                    delays=tuple(spec.name for spec in declared.delays),
                    dead=declared.dead.name,
                )
            )
        return rows

    def _target(self, operator: Operator, queue: str) -> Target:
        # Only a listener's queue: the console is no general queue browser.
        if queue not in self.queues():
            raise ConfigurationError(f"{queue!r} is not the queue of a listener shown here")
        return operator.target(queue)


class JobSource(Protocol):
    """Where the Workers and Jobs pages read from: the job ledger.

    `available` False means the pages show `missing` instead of data.
    """

    @property
    def available(self) -> bool:
        """Whether there is a ledger to read."""
        ...

    @property
    def missing(self) -> str:
        """What the pages say when there is none."""
        ...

    def workers(self) -> list[dict[str, Any]]:
        """Every worker on every host: host, pid, listener, busy with, since."""
        ...

    def jobs(
        self,
        *,
        message_id: str | None = None,
        listener: str | None = None,
        state: str | None = None,
        tag: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Jobs matching the search, newest first."""
        ...

    def job(self, message_id: str) -> dict[str, Any] | None:
        """One job with its publish and every attempt, or None."""
        ...


@dataclass(frozen=True, slots=True)
class NoLedger:
    """No job ledger: the Workers and Jobs pages say what is missing."""

    missing: str
    available: bool = False

    def workers(self) -> list[dict[str, Any]]:
        return []

    def jobs(
        self,
        *,
        message_id: str | None = None,
        listener: str | None = None,
        state: str | None = None,
        tag: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        return []

    def job(self, message_id: str) -> dict[str, Any] | None:
        return None


def job_source() -> JobSource:
    """The ledger reader for this installation, or `NoLedger` saying why there is none."""
    if not os.environ.get("AMQP_LISTENER_DATABASE_URL"):
        return NoLedger(
            "This page needs the job ledger: set AMQP_LISTENER_DATABASE_URL (PostgreSQL, "
            "or SQLite on one host), install amqp-listener[db], and run "
            "`amqp-listener db upgrade`."
        )
    return NoLedger(
        "AMQP_LISTENER_DATABASE_URL is set, but this version of the console has no job "
        "ledger reader yet."
    )
