"""What feeds the ledger: the worker's middleware, and the publish record made by `notify()`.

Both only build a small record and hand it to a `Recorder` (a bounded buffer written by a
thread), so the delivery and publish paths never wait for the database.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from listener import delay as _delay
from listener.middleware import Delivery, Middleware
from listener.recorder import HOST, AttemptRecord, Recorder, Retention, WorkerBeat, recorder_for
from listener.settings import Settings, get_settings
from listener.topology import delay_queue_name

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.outcome import Failure
    from listener.runner.worker import Worker

__all__ = ["LedgerMiddleware", "ledger_middleware", "record_publish", "tags_of"]

log = logging.getLogger("listener.ledger")

_MAX_TAGS = 20


class LedgerMiddleware(Middleware):
    """Records every attempt, and reports this worker's heartbeat row every few seconds."""

    def __init__(self, settings: Settings) -> None:
        assert settings.database_url is not None
        self.settings = settings
        self.started_at = dt.datetime.now(dt.UTC)
        self.listeners: tuple[str, ...] = ()
        self.counts = {"handled": 0, "retried": 0, "parked": 0}
        #: What runs now, by delivery: message id, listener, queue, attempt, since.
        self.running: dict[int, tuple[str, str, str, int, dt.datetime]] = {}
        self._names: dict[type[Listener], str] = {}
        self._untracked = _base_track()  # Listener.track, which tracks nothing
        self.recorder = Recorder(
            settings.database_url.get_secret_value(),
            capacity=settings.ledger_buffer,
            heartbeat=self._beat,
            in_progress=self._in_progress,
            retention=Retention(
                settings.ledger_keep_handled_days, settings.ledger_keep_failed_days
            ),
        )
        # The database client's imports now, before the worker consumes: on_worker_start
        # runs once messages flow, and would stall the first of them.
        self.recorder.prepare()
        self._pid = os.getpid()

    def on_worker_start(self, worker: Worker) -> None:
        self.listeners = tuple(cls.name() for cls in worker.listeners)
        self._pid = os.getpid()
        self.recorder.start()

    def on_worker_stop(self, worker: Worker) -> None:
        self.recorder.close()

    def before_handle(self, delivery: Delivery) -> None:
        # Only remembered: the recorder writes a `running` row for an attempt still under
        # way when it next writes (its `in_progress`), so a quick one costs one row.
        now = dt.datetime.now(dt.UTC)
        listener = delivery.listener
        delivery.state["ledger.started_at"] = now
        self.running[id(delivery)] = (
            delivery.message_id,
            self._name(listener),
            listener.queue,
            delivery.attempt,
            now,
        )

    def on_retry(self, delivery: Delivery, *, delay: float, failure: Failure) -> None:
        queue = delivery.listener.queue
        delivery.state["ledger.next"] = delay_queue_name(queue, delay) if delay > 0 else queue

    def on_park(self, delivery: Delivery, *, reason: str, failure: Failure) -> None:
        delivery.state["ledger.next"] = f"{delivery.listener.queue}.dead"

    def after_handle(
        self, delivery: Delivery, *, outcome: str, failure: Failure | None, duration: float
    ) -> None:
        self.running.pop(id(delivery), None)
        if outcome in self.counts:
            self.counts[outcome] += 1
        started_at = delivery.state.get("ledger.started_at")
        if started_at is None:
            return
        listener = delivery.listener
        next_queue = listener.queue if outcome == "returned" else delivery.state.get("ledger.next")
        tags: tuple[str, ...] = ()
        if delivery.message is not None and listener.track is not self._untracked:
            tags = tags_of(listener, delivery.message)
        self.recorder.add(
            AttemptRecord(
                delivery.message_id,
                self._name(listener),
                listener.queue,
                delivery.attempt,
                outcome,
                HOST,
                self._pid,
                started_at,
                None,  # finished `duration` after `started_at`: computed by the writer
                duration,
                next_queue,
                failure.exception_type if failure else None,
                failure.message if failure else None,
                (failure.traceback or None) if failure else None,
                tags,
            )
        )

    def _name(self, listener: type[Listener]) -> str:
        name = self._names.get(listener)
        if name is None:
            name = self._names[listener] = listener.name()
        return name

    def _in_progress(self) -> list[AttemptRecord]:
        # Runs on the recorder's thread: copy first, the loop changes the dict.
        return [
            AttemptRecord(message_id, name, queue, attempt, "running", HOST, self._pid, since)
            for message_id, name, queue, attempt, since in self.running.copy().values()
        ]

    def _beat(self) -> WorkerBeat:
        # Runs on the recorder's thread too.
        running = [
            {"message_id": message_id, "listener": name, "since": since.isoformat()}
            for message_id, name, _, _, since in self.running.copy().values()
        ]
        return WorkerBeat(
            listeners=self.listeners,
            started_at=self.started_at,
            running=running,
            handled=self.counts["handled"],
            retried=self.counts["retried"],
            parked=self.counts["parked"],
        )


def ledger_middleware() -> list[Middleware]:
    """The ledger's middleware when a database is configured, else nothing."""
    settings = get_settings()
    if settings.database_url is None:
        return []
    return [LedgerMiddleware(settings)]


def tags_of(listener: type[Listener], message: Any) -> tuple[str, ...]:
    """What `listener.track(message)` returns, as strings; nothing if it fails (logged)."""
    if listener.track is _base_track():
        return ()
    try:
        found = listener.track(listener.__new__(listener), message)
        tags = tuple(str(tag) for tag in _first(found, _MAX_TAGS))
    except Exception:
        log.exception("%s.track() failed; the message is recorded without tags", listener.__name__)
        return ()
    return tags


def record_publish(
    listener: type[Listener],
    message_ids: Sequence[str],
    bodies: Sequence[bytes],
    headers: dict[str, Any] | None = None,
) -> None:
    """Record each published message as pending, with this process as its publisher, and,
    for a delayed one (`headers` with `listener.delay.DUE_HEADER`), when it is due.

    Does nothing without a database URL; never raises (a publish has already happened).
    """
    try:
        settings = get_settings()
        if settings.database_url is None:
            return
        recorder = recorder_for(settings.database_url.get_secret_value(), settings.ledger_buffer)
        now = dt.datetime.now(dt.UTC)
        name = listener.name()
        pid = os.getpid()
        due = _due_at(headers)
        for message_id, body in zip(message_ids, bodies, strict=True):
            tags: tuple[str, ...] = ()
            if listener.track is not _base_track():
                tags = tags_of(listener, listener.codec.decode(body, None, None))
            recorder.add(
                AttemptRecord(
                    message_id,
                    name,
                    listener.queue,
                    0,
                    "pending",
                    HOST,
                    pid,
                    now,
                    tags=tags,
                    due_at=due,
                )
            )
    except Exception:
        log.exception("could not record the publish of %s in the ledger", listener.__name__)


def _due_at(headers: dict[str, Any] | None) -> dt.datetime | None:
    if not headers or _delay.DUE_HEADER not in headers:
        return None
    try:
        return dt.datetime.fromisoformat(str(headers[_delay.DUE_HEADER]))
    except ValueError:
        return None


def _base_track() -> Any:
    from listener.listener import Listener

    return Listener.track


def _first(values: Iterable[Any], limit: int) -> list[Any]:
    if isinstance(values, str):  # one tag returned bare
        return [values]
    result = []
    for value in values:
        result.append(value)
        if len(result) == limit:
            break
    return result
