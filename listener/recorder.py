"""The recorder: takes ledger records off the hot path and writes them in batches.

`add()` only appends to a bounded in-memory buffer; a background thread writes what
accumulated every half second, in one transaction per batch. When the database is away the
records wait in the buffer and the thread retries with backoff; handling goes on. When the
buffer is full, new records are dropped: counted (`amqp_listener_ledger_dropped_records_total`
and one log line per outage), and written as a *gap* (when and how many) once the database
answers again, so that the ledger can say "gap" for that time instead of "did not run".

A process that publishes with a database URL set has one recorder for that URL
(`recorder_for`); it is flushed at exit (up to `_EXIT_FLUSH_SECONDS`), so a script that
exits right after `notify()` still leaves its pending rows.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from prometheus_client import Counter
    from sqlalchemy.engine import Engine

__all__ = ["AttemptRecord", "Gap", "Recorder", "Retention", "WorkerBeat", "recorder_for"]

log = logging.getLogger("listener.ledger")

HOST = socket.gethostname()
_LINGER = 0.5  # seconds records wait to be batched
_BATCH = 1000
_BATCHES_PER_ROUND = 20
_MAX_BACKOFF = 10.0
_BEAT_EVERY = 5.0
_PRUNE_EVERY = 600.0
_PRUNE_BATCHES = 20  # per round: a big backlog is worked off over several rounds
_EXIT_FLUSH_SECONDS = 5.0


#: Exception messages and tracebacks are cut to these many characters.
MAX_MESSAGE = 500
MAX_TRACEBACK = 4000


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to build, on the hot path
class AttemptRecord:
    """One row of `amqp_listener_attempts` as a process hands it to its recorder.

    A record with outcome `running` opens an attempt; the record with the same `started_at`
    and a final outcome closes it (one row in the end: an attempt that finishes before the
    recorder writes its start is written once). Without `finished_at`, a record with a
    `duration` finished that long after it started. Treat records as immutable.
    """

    message_id: str
    listener: str
    queue: str
    attempt: int
    outcome: str
    host: str
    pid: int
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    duration: float | None = None
    next_queue: str | None = None
    exception_type: str | None = None
    exception_message: str | None = None
    traceback: str | None = None
    tags: tuple[str, ...] = ()
    #: A delayed message's publish: when it is due in its listener's queue.
    due_at: dt.datetime | None = None

    @property
    def key(self) -> tuple[str, str, int, str, int, dt.datetime]:
        return (
            self.message_id,
            self.listener,
            self.attempt,
            self.host,
            self.pid,
            self.started_at,
        )

    def values(self) -> tuple[Any, ...]:
        """The row's values, in the order of `COLUMNS`."""
        return (
            self.message_id,
            self.listener,
            self.queue,
            self.attempt,
            self.outcome,
            self.host,
            self.pid,
            self.started_at,
            self.finished_at
            if self.finished_at is not None or self.duration is None
            else self.started_at + dt.timedelta(seconds=self.duration),
            self.duration,
            self.next_queue,
            self.exception_type,
            cut(self.exception_message, MAX_MESSAGE),
            cut(self.traceback, MAX_TRACEBACK, keep_end=True),
            self.due_at,
        )

    def row(self) -> dict[str, Any]:
        """The row, by column name."""
        return dict(zip(COLUMNS, self.values(), strict=True))


#: The columns of an attempt row that a record fills (all but the id).
COLUMNS = (
    "message_id",
    "listener",
    "queue",
    "attempt",
    "outcome",
    "host",
    "pid",
    "started_at",
    "finished_at",
    "duration",
    "next_queue",
    "exception_type",
    "exception_message",
    "traceback",
    "due_at",
)


@dataclass(frozen=True, slots=True)
class Gap:
    """A stretch of time in which one process dropped `dropped` records."""

    host: str
    pid: int
    started_at: dt.datetime
    ended_at: dt.datetime
    dropped: int


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    """What a worker reports every few seconds: the row of `amqp_listener_workers`."""

    listeners: tuple[str, ...]
    started_at: dt.datetime
    running: list[dict[str, str]]
    handled: int
    retried: int
    parked: int


@dataclass(frozen=True, slots=True)
class Retention:
    """How long records are kept, in days, by how their message ended."""

    handled_days: float
    failed_days: float


class Recorder:
    """A bounded buffer of ledger records and the thread that writes them.

    Args:
        url: the database URL.
        capacity: records held at most; past that, new ones are dropped and counted.
        heartbeat: called every few seconds for this worker's row (workers only).
        in_progress: the attempts under way now (workers only); one still running after
            `linger` is written as a `running` row, which its end then completes. An attempt
            that ends sooner costs the hot path one record and the database one row.
        retention: prune expired records every few minutes (workers only).
    """

    def __init__(
        self,
        url: str,
        *,
        capacity: int = 10_000,
        heartbeat: Callable[[], WorkerBeat] | None = None,
        in_progress: Callable[[], list[AttemptRecord]] | None = None,
        retention: Retention | None = None,
        linger: float = _LINGER,
    ) -> None:
        self.url = url
        self.capacity = capacity
        self.heartbeat = heartbeat
        self.in_progress = in_progress
        self.retention = retention
        self.linger = linger
        self.pid = os.getpid()
        #: Records dropped since this recorder started (the buffer was full).
        self.dropped = 0
        #: Records written since this recorder started.
        self.written = 0
        self._records: deque[AttemptRecord] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._open: set[Any] = set()
        self._gap: Gap | None = None
        self._outage_since: float | None = None
        self._flushed = threading.Condition()

    def __repr__(self) -> str:
        return (
            f"<Recorder written={self.written} waiting={len(self._records)} dropped={self.dropped}>"
        )

    # -- the hot path ------------------------------------------------------------------------

    def add(self, record: AttemptRecord) -> None:
        """Buffer `record` for the writer; never blocks, never raises."""
        if len(self._records) >= self.capacity:
            self._drop()
            return
        self._records.append(record)
        if self._thread is None:
            self._start()

    def _drop(self) -> None:
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            self.dropped += 1
            first = self._gap is None
            if self._gap is None:
                self._gap = Gap(HOST, self.pid, now, now, 1)
            else:
                gap = self._gap
                self._gap = Gap(gap.host, gap.pid, gap.started_at, now, gap.dropped + 1)
        _dropped_counter().inc()
        if first:
            log.error(
                "ledger buffer full (%d records waiting for the database): new records are "
                "dropped and the time is recorded as a gap",
                self.capacity,
            )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer now (it starts with the first record otherwise)."""
        self._start()

    def prepare(self) -> None:
        """Import the database client and make the engine (no I/O), in the caller.

        Done on the writer's thread, this would compete for the interpreter lock with the
        caller's next steps. Without a call, the first record of a process pays for it, as
        its first publish pays for a connection.
        """
        try:
            self._database()
        except Exception:
            log.exception("ledger: cannot set up the database client; records will wait")

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self.prepare()
            self.pid = os.getpid()
            self._thread = threading.Thread(
                target=self._run, name="amqp-listener-ledger", daemon=True
            )
            self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record added so far is written; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._flushed:
            while self._records or self._gap is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._thread is None:
                    return False
                self._flushed.wait(min(remaining, 0.1))
        return True

    def close(self, timeout: float = _EXIT_FLUSH_SECONDS) -> None:
        """Write what waits (for up to `timeout` seconds), then stop the writer."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout)
        with self._lock:
            # A record added from now on starts a new writer.
            self._thread = None
            self._stop = threading.Event()
        if self._records:
            log.error(
                "ledger: %d records were not written before exit (the database at %s did "
                "not answer)",
                len(self._records),
                _where(self.url),
            )
        if self._engine is not None:
            self._engine.dispose()

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.0
        next_beat = 0.0
        next_prune = time.monotonic() + 60.0
        stop = self._stop  # close() gives later writers a fresh one
        while True:
            stopping = stop.wait(backoff or self.linger)
            now = time.monotonic()
            ok = self._write_all()
            while stopping and ok and self._records:
                ok = self._write_all()
            if ok and self.heartbeat is not None and (now >= next_beat or stopping):
                ok = self._beat(gone=stopping)
                next_beat = now + _BEAT_EVERY
            if ok and self.retention is not None and now >= next_prune and not stopping:
                self._prune(self.retention)
                next_prune = now + _PRUNE_EVERY
            if stopping:
                return  # close() reports what could not be written
            backoff = 0.0 if ok else min(_MAX_BACKOFF, max(1.0, backoff * 2))

    def _write_all(self) -> bool:
        from listener.ledger import write_batch

        opened = self._long_running()
        rounds = _BATCHES_PER_ROUND  # then back to the loop: the heartbeat must not starve
        while (self._records or self._gap is not None or opened) and rounds:
            rounds -= 1
            batch = [self._records[i] for i in range(min(_BATCH, len(self._records)))]
            with self._lock:
                gap, self._gap = self._gap, None
            try:
                with self._database().begin() as connection:
                    still_open = write_batch(
                        connection, [*opened, *batch], open_attempts=self._open, gap=gap
                    )
            except Exception as exc:
                self._put_back(gap)
                self._outage(exc)
                return False
            self._open = still_open
            opened = []
            for _ in batch:
                self._records.popleft()
            self.written += len(batch)
            self._recovered(gap)
            with self._flushed:
                self._flushed.notify_all()
        return True

    def _long_running(self) -> list[AttemptRecord]:
        if self.in_progress is None:
            return []
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.linger)
        return [
            record
            for record in self.in_progress()
            if record.started_at <= cutoff and record.key not in self._open
        ]

    def _put_back(self, gap: Gap | None) -> None:
        if gap is None:
            return
        with self._lock:
            later = self._gap
            if later is not None:
                gap = Gap(
                    gap.host, gap.pid, gap.started_at, later.ended_at, gap.dropped + later.dropped
                )
            self._gap = gap

    def _outage(self, exc: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            from listener.database import describe_error

            log.warning(
                "ledger: %s; %d records wait in memory (up to %d), handling goes on",
                describe_error(exc, self.url),
                len(self._records),
                self.capacity,
            )

    def _recovered(self, gap: Gap | None) -> None:
        if self._outage_since is not None:
            log.warning(
                "ledger: the database answers again after %.0f s; waiting records written",
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
        if gap is not None:
            log.error(
                "ledger: %d records were dropped between %s and %s; recorded as a gap",
                gap.dropped,
                gap.started_at.isoformat(timespec="seconds"),
                gap.ended_at.isoformat(timespec="seconds"),
            )

    def _beat(self, *, gone: bool) -> bool:
        from listener.ledger import forget_worker, report_worker

        assert self.heartbeat is not None
        try:
            with self._database().begin() as connection:
                if gone:
                    forget_worker(connection, HOST, self.pid)
                else:
                    report_worker(connection, HOST, self.pid, self.heartbeat())
        except Exception as exc:
            self._outage(exc)
            return False
        return True

    def _prune(self, retention: Retention) -> None:
        from listener.ledger import prune

        now = dt.datetime.now(dt.UTC)
        handled_before = now - dt.timedelta(days=retention.handled_days)
        failed_before = now - dt.timedelta(days=retention.failed_days)
        try:
            for _ in range(_PRUNE_BATCHES):
                with self._database().begin() as connection:
                    if not prune(
                        connection, handled_before=handled_before, failed_before=failed_before
                    ):
                        return
        except Exception as exc:
            self._outage(exc)

    def _database(self) -> Engine:
        if self._engine is None:
            from listener.database import create_engine

            options: dict[str, Any] = {"pool_size": 1, "max_overflow": 1}
            if not self.url.startswith("sqlite"):
                options["connect_args"] = {"connect_timeout": 5}
            self._engine = create_engine(self.url, **options)
            from listener import ledger  # noqa: F401 - the writer's statements
        return self._engine


# -- one recorder per process and URL --------------------------------------------------------

_recorders: dict[tuple[int, str], Recorder] = {}
_recorders_lock = threading.Lock()


def recorder_for(url: str, capacity: int = 10_000) -> Recorder:
    """This process's recorder for `url`, flushed at exit (a forked child gets its own)."""
    key = (os.getpid(), url)
    recorder = _recorders.get(key)
    if recorder is not None:
        return recorder
    with _recorders_lock:
        recorder = _recorders.get(key)
        if recorder is None:
            recorder = _recorders[key] = Recorder(url, capacity=capacity)
    return recorder


@atexit.register
def _close_all() -> None:
    pid = os.getpid()
    for (owner, _), recorder in list(_recorders.items()):
        if owner == pid:
            recorder.close()


_counter: Counter | None = None
#: The ledger's own metrics (`amqp_listener_ledger_dropped_records_total`).
METRICS = CollectorRegistry()


def _dropped_counter() -> Counter:
    global _counter
    if _counter is None:
        from prometheus_client import Counter

        # In a registry of its own, as every metric of the framework stays out of
        # prometheus_client's global one: under `run --metrics-port` (multiprocess mode)
        # its value reaches the endpoint anyway, which reads every process's files.
        _counter = Counter(
            "amqp_listener_ledger_dropped_records",
            "Ledger records dropped because the buffer was full while the database was away.",
            registry=METRICS,
        )
    return _counter


def _where(url: str) -> str:
    from listener.database import redact_database_url

    return redact_database_url(url)


def cut(text: str | None, limit: int, *, keep_end: bool = False) -> str | None:
    if text is None or len(text) <= limit:
        return text
    if keep_end:  # the end of a traceback says where it failed
        return "..." + text[-(limit - 3) :]
    return text[: limit - 3] + "..."


def utc(moment: dt.datetime) -> dt.datetime:
    """`moment` as an aware UTC time: SQLite hands back naive ones, and ledger times are UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
