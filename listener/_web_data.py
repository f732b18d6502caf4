"""What the web console shows, and where it comes from.

* The broker (`BrokerSource`): queue counts, parked messages, replay and purge, through
  the operator commands (`listener.operations`), so the console behaves as the CLI does.
  Counts are cached: however many tabs poll, the broker is asked about each listener at
  most once per `ttl` seconds.
* The job ledger (`JobSource`): workers, jobs and the overview's charts, read with the
  queries of `listener.jobs` (`LedgerSource`); without a database URL, `NoLedger` says
  what is missing.

Every call here is synchronous (pika); the app runs them in a worker thread.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from listener import jobs
from listener import schedule as _schedule
from listener.errors import ConfigurationError, ListenerError
from listener.jobs import Activity, Gap, Job, WorkerStatus
from listener.listener import Listener
from listener.operations import DelayStatus, Operator, QueueStatus, Target
from listener.parked import Page, Parked, ReplayResult
from listener.settings import Settings

__all__ = [
    "BrokerSource",
    "JobSource",
    "LedgerError",
    "LedgerSource",
    "NoLedger",
    "TopologyRow",
    "job_source",
]

T = TypeVar("T")

#: Seconds the overview's counts are reused: the idle cost promised to the broker.
OVERVIEW_TTL = 5.0
#: Seconds, on average, a delay queue found missing is not asked about again (only the delay
#: queues of earlier versions are ever missing for long, and nothing declares them any more).
#: Each is asked again after 0.5 to 1.5 times this, so that the questions spread over the
#: refreshes instead of all coming back in one slow refresh.
ABSENT_TTL = 300.0


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
        self._cached: tuple[float, list[QueueStatus], DelayStatus] | None = None
        self._absent: dict[str, float] = {}  # delay queue -> when to ask about it again
        self.queries = 0  # how many times the broker was asked (tests read it)

    def overview(self) -> tuple[list[QueueStatus], float]:
        """Every listener's counts, and how old they are in seconds."""
        rows, _delays, age = self._counts()
        return rows, age

    def delays(self) -> DelayStatus:
        """The shared delay levels' counts (taken with the listeners')."""
        return self._counts()[1]

    def _counts(self) -> tuple[list[QueueStatus], DelayStatus, float]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.ttl:
                absent = {name for name, until in self._absent.items() if until > now}
                known = set(absent)
                with Operator(self.settings) as operator:
                    rows = operator.status(self.listeners, absent=absent)
                    delays = operator.delay_status()
                self._absent = {name: self._absent[name] for name in known}
                for name in absent - known:  # found missing just now
                    self._absent[name] = now + ABSENT_TTL * random.uniform(0.5, 1.5)
                self.queries += 1
                self._cached = (time.monotonic(), rows, delays)
            taken, rows, delays = self._cached
            return rows, delays, time.monotonic() - taken

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

    def schedules(self) -> list[dict[str, Any]]:
        """The scheduled listeners given by module, as `amqp-listener schedules` shows them."""
        from listener._cli_schedules import schedule_rows
        from listener.scheduler import scheduled

        listeners = scheduled(self.listeners or [])
        if not listeners:
            return []
        try:
            zone = _schedule.time_zone(self.settings.schedule_timezone)
        except ValueError as exc:  # a zone name this host does not know
            raise ConfigurationError(str(exc)) from exc
        now = dt.datetime.now(dt.UTC)
        with Operator(self.settings) as operator:
            return schedule_rows(operator, listeners, zone, now)

    def _target(self, operator: Operator, queue: str) -> Target:
        # Only a listener's queue: the console is no general queue browser.
        if queue not in self.queues():
            raise ConfigurationError(f"{queue!r} is not the queue of a listener shown here")
        return operator.target(queue)


class JobSource(Protocol):
    """Where the Workers and Jobs pages, and the overview's charts, read from: the job ledger.

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

    def workers(self) -> list[WorkerStatus]:
        """Every worker on every host, as `amqp-listener workers` shows them."""
        ...

    def jobs(
        self,
        *,
        message_id: str | None = None,
        listener: str | None = None,
        state: str | None = None,
        tag: str | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """Jobs matching the search, the most recently active first."""
        ...

    def story(self, message_id: str) -> tuple[list[Job], list[Gap]]:
        """Every job of one message (empty when unknown), and the ledger's gaps since."""
        ...

    def activity(self) -> list[Activity]:
        """Attempts ended per minute and listener over the last hour."""
        ...

    def delayed(self) -> dict[str, int]:
        """Per listener queue, the delayed messages not due yet (see `jobs.delayed`)."""
        ...


@dataclass(frozen=True, slots=True)
class NoLedger:
    """No job ledger: the Workers and Jobs pages say what is missing."""

    missing: str
    available: bool = False

    def workers(self) -> list[WorkerStatus]:
        return []

    def jobs(
        self,
        *,
        message_id: str | None = None,
        listener: str | None = None,
        state: str | None = None,
        tag: str | None = None,
        limit: int = 50,
    ) -> list[Job]:
        return []

    def story(self, message_id: str) -> tuple[list[Job], list[Gap]]:
        return [], []

    def activity(self) -> list[Activity]:
        return []

    def delayed(self) -> dict[str, int]:
        return {}


class LedgerSource:
    """The job ledger, read with the same queries as `amqp-listener jobs` and `workers`.

    One engine (a small pool) for the console's life. A database failure becomes a
    `LedgerError` naming the database (never its password) and what failed.
    """

    available = True
    missing = ""

    def __init__(self, url: str, *, ttl: float = OVERVIEW_TTL) -> None:
        from listener.database import create_engine

        self._url = url
        self.engine = create_engine(url)
        self.ttl = ttl
        self._lock = threading.Lock()
        self._activity: tuple[float, list[Activity]] | None = None

    def workers(self) -> list[WorkerStatus]:
        return self._read(lambda: jobs.workers(engine=self.engine))

    def jobs(
        self,
        *,
        message_id: str | None = None,
        listener: str | None = None,
        state: str | None = None,
        tag: str | None = None,
        limit: int = 50,
    ) -> list[Job]:
        if message_id is None:
            found = self._read(
                lambda: jobs.find(
                    listener=listener, tag=tag, state=state, limit=limit, engine=self.engine
                )
            )
        else:  # one message: its jobs, narrowed by the other fields
            found = [
                job
                for job in self._read(lambda: jobs.show(message_id, engine=self.engine))
                if (listener is None or job.listener == listener)
                and (state is None or job.state == state)
                and (tag is None or tag in job.tags)
            ]
        return sorted(found, key=lambda job: job.updated_at, reverse=True)

    def story(self, message_id: str) -> tuple[list[Job], list[Gap]]:
        return self._read(lambda: jobs.story(message_id, engine=self.engine))

    def activity(self) -> list[Activity]:
        """Cached for `ttl` seconds, as the broker's counts are: tabs do not add queries."""
        with self._lock:
            now = time.monotonic()
            if self._activity is None or now - self._activity[0] >= self.ttl:
                self._activity = (now, self._read(lambda: jobs.activity(engine=self.engine)))
            return self._activity[1]

    def delayed(self) -> dict[str, int]:
        return self._read(lambda: jobs.delayed(engine=self.engine))

    def close(self) -> None:
        self.engine.dispose()

    def _read(self, query: Callable[[], T]) -> T:
        from sqlalchemy.exc import SQLAlchemyError

        from listener.database import describe_error

        try:
            return query()
        except SQLAlchemyError as exc:
            raise LedgerError(describe_error(exc, self._url)) from exc


class LedgerError(ListenerError):
    """The ledger's database did not answer a read (the text says what to check)."""


def job_source(settings: Settings) -> JobSource:
    """The ledger reader for this installation, or `NoLedger` saying why there is none."""
    if settings.database_url is None:
        return NoLedger(
            "This page needs the job ledger: set AMQP_LISTENER_DATABASE_URL (or start the "
            "console with --database-url) to PostgreSQL, or SQLite on one host, install "
            "amqp-listener[db], and run `amqp-listener db upgrade`."
        )
    try:
        return LedgerSource(settings.database_url.get_secret_value())
    except ConfigurationError as exc:  # no sqlalchemy, or a URL it cannot use
        return NoLedger(f"The job ledger cannot be read: {exc}")
