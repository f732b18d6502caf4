"""Reading the ledger: did it run, did it fail, how, where.

A *job* is one message as one listener sees it (two listeners on one key make two jobs of
one message). Its state comes from its last record:

| last record                                 | state      | where it is now              |
| ------------------------------------------- | ---------- | ---------------------------- |
| the publish (no attempt yet)                | `pending`  | the queue (or, until it is   |
|                                             |            | due, the delay levels)       |
| an attempt under way                        | `running`  | with the worker              |
| retried, or its worker died, or handed back | `retrying` | a delay queue, or the queue  |
| handled                                     | `handled`  | nowhere: acked               |
| parked                                      | `parked`   | `<queue>.dead`               |

    from listener import jobs
    for job in jobs.find(tag="Account:121", state="parked"):
        print(job.message_id, job.attempts[-1].exception_type)

Everything here needs a database (`AMQP_LISTENER_DATABASE_URL`) and the `db` extra.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from listener.errors import ConfigurationError
from listener.recorder import utc
from listener.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from listener.listener import Listener

__all__ = [
    "STATES",
    "UNFINISHED",
    "Activity",
    "Attempt",
    "Gap",
    "Job",
    "Running",
    "WorkerStatus",
    "activity",
    "delayed",
    "find",
    "gaps_since",
    "show",
    "story",
    "workers",
]

STATES = ("pending", "running", "retrying", "handled", "parked")
UNFINISHED = ("pending", "running", "retrying")

#: The most records a search without a tag reads (see `_recent`).
_WIDEST = 50_000

_STATE_OF = {
    "pending": "pending",
    "running": "running",
    "retried": "retrying",
    "worker_lost": "retrying",
    "returned": "pending",  # handed back unsettled (a stop, a lost channel): not charged
    "handled": "handled",
    "parked": "parked",
}


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt: where, when, how long, how it ended (attempt 0 is the publish)."""

    attempt: int
    outcome: str
    host: str
    pid: int
    started_at: dt.datetime
    finished_at: dt.datetime | None
    duration: float | None
    next_queue: str | None
    exception_type: str | None
    exception_message: str | None
    traceback: str | None
    #: A delayed publish: when the message is due in the listener's queue.
    due_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """One message as one listener saw it: its publish and every attempt, oldest first."""

    message_id: str
    listener: str
    queue: str
    state: str
    where: str
    attempts: tuple[Attempt, ...]
    tags: tuple[str, ...] = field(default=())

    @property
    def published(self) -> Attempt | None:
        """The publish record (host, pid, time), if a process with the database URL sent it."""
        first = self.attempts[0] if self.attempts else None
        return first if first is not None and first.attempt == 0 else None

    @property
    def updated_at(self) -> dt.datetime:
        last = self.attempts[-1]
        return last.finished_at or last.started_at


@dataclass(frozen=True, slots=True)
class Gap:
    """A stretch of time in which a process dropped ledger records (the database was away)."""

    host: str
    pid: int
    started_at: dt.datetime
    ended_at: dt.datetime
    dropped: int


def find(
    *,
    listener: type[Listener] | str | None = None,
    tag: str | None = None,
    state: str | Sequence[str] | None = None,
    since: dt.datetime | dt.timedelta | None = None,
    limit: int = 100,
    engine: Engine | None = None,
) -> list[Job]:
    """Jobs by listener (a class or its `module:Class` name), tag, state and time.

    `since` (a moment, or a duration back from now) keeps jobs with a record since then.
    Returns the `limit` most recently active jobs, oldest first.

    Raises:
        ValueError: an unknown state.
        ConfigurationError: no database is configured.
    """
    states = _states(state)
    with _connection(engine) as connection:
        return _find(connection, listener, tag, states, _moment(since), limit)


def show(message_id: str, *, engine: Engine | None = None) -> list[Job]:
    """Every job of one message (one per listener that saw it); empty when unknown."""
    from listener.ledger import attempts

    with _connection(engine) as connection:
        rows = connection.execute(
            attempts.select()
            .where(attempts.c.message_id == message_id)
            .order_by(attempts.c.listener, *_story_order())
        ).all()
        return _jobs(connection, rows)


def story(message_id: str, *, engine: Engine | None = None) -> tuple[list[Job], list[Gap]]:
    """`show(message_id)`, with the gaps since its first record (or in the last 30 days when
    there is none): what may explain a missing attempt, or a missing message."""
    found = show(message_id, engine=engine)
    first = min((job.attempts[0].started_at for job in found), default=None)
    since = first or dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    return found, gaps_since(since, engine=engine)


def gaps_since(since: dt.datetime, *, engine: Engine | None = None) -> list[Gap]:
    """Stretches since `since` in which records were dropped, oldest first."""
    from listener.ledger import gaps

    with _connection(engine) as connection:
        rows = connection.execute(
            gaps.select().where(gaps.c.ended_at >= since).order_by(gaps.c.started_at)
        ).all()
    return [
        Gap(row.host, row.pid, utc(row.started_at), utc(row.ended_at), row.dropped) for row in rows
    ]


def delayed(*, engine: Engine | None = None) -> dict[str, int]:
    """Per listener queue, the messages published with a delay that are not due yet: those
    whose publisher had the database URL. The broker cannot tell: the delay levels are
    shared by every listener."""
    from sqlalchemy import func, select

    from listener.ledger import attempts

    now = dt.datetime.now(dt.UTC)
    with _connection(engine) as connection:
        rows = connection.execute(
            select(attempts.c.queue, func.count())
            .where(attempts.c.due_at > now, attempts.c.attempt == 0)
            .group_by(attempts.c.queue)
        ).all()
    return {str(name): int(count) for name, count in rows}


#: A worker silent for this long is shown as lost.
LOST_AFTER = dt.timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class Running:
    """A message a worker runs now."""

    message_id: str
    listener: str
    since: dt.datetime


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One worker process as it last reported itself."""

    host: str
    pid: int
    listeners: tuple[str, ...]
    started_at: dt.datetime
    seen_at: dt.datetime
    running: tuple[Running, ...]
    handled: int
    retried: int
    parked: int
    lost: bool

    @property
    def busy(self) -> bool:
        return bool(self.running) and not self.lost


def workers(*, engine: Engine | None = None) -> list[WorkerStatus]:
    """Every worker that reported itself, by host and pid; `lost` when silent for 30 s."""
    from listener.ledger import workers as table

    now = dt.datetime.now(dt.UTC)
    with _connection(engine) as connection:
        rows = connection.execute(table.select().order_by(table.c.host, table.c.pid)).all()
    found = []
    for row in rows:
        seen = utc(row.seen_at)
        running = tuple(
            Running(item["message_id"], item["listener"], dt.datetime.fromisoformat(item["since"]))
            for item in json.loads(row.running)
        )
        found.append(
            WorkerStatus(
                row.host,
                row.pid,
                tuple(name for name in row.listeners.split(",") if name),
                utc(row.started_at),
                seen,
                running,
                row.handled,
                row.retried,
                row.parked,
                lost=now - seen > LOST_AFTER,
            )
        )
    return found


@dataclass(frozen=True, slots=True)
class Activity:
    """One listener's attempts that ended, per minute, oldest minute first.

    `failed` counts attempts that raised and will be tried again (retried, or their worker
    died); `parked` those that ended the message in its dead-letter queue.
    """

    listener: str
    since: dt.datetime
    handled: tuple[int, ...]
    failed: tuple[int, ...]
    parked: tuple[int, ...]


_ACTIVITY = {"handled": "handled", "retried": "failed", "worker_lost": "failed", "parked": "parked"}


def activity(*, minutes: int = 60, engine: Engine | None = None) -> list[Activity]:
    """Per listener, how many attempts ended handled, failed and parked in each of the last
    `minutes` minutes (the current one last); listeners without any are left out.

    Counted by the database, grouped by minute: one query, however busy the hour was.
    """
    from sqlalchemy import Integer, cast, func, select

    from listener.ledger import attempts

    now = dt.datetime.now(dt.UTC)
    this_minute = int(now.timestamp()) // 60
    since = dt.datetime.fromtimestamp((this_minute - minutes + 1) * 60, dt.UTC)
    with _connection(engine) as connection:
        if connection.dialect.name == "sqlite":
            epoch = cast(func.strftime("%s", attempts.c.finished_at), Integer)
        else:
            # Floored: a cast rounds, and would count 12:00:59.6 in the minute after.
            epoch = cast(func.floor(func.extract("epoch", attempts.c.finished_at)), Integer)
        minute = (epoch // 60).label("minute")
        rows = connection.execute(
            select(attempts.c.listener, attempts.c.outcome, minute, func.count().label("n"))
            .where(attempts.c.outcome.in_(_ACTIVITY), attempts.c.finished_at >= since)
            .group_by(attempts.c.listener, attempts.c.outcome, minute)
        ).all()
    counts: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        slot = int(row.minute) - (this_minute - minutes + 1)
        if not 0 <= slot < minutes:
            continue
        series = counts.setdefault(
            row.listener, {name: [0] * minutes for name in ("handled", "failed", "parked")}
        )
        series[_ACTIVITY[row.outcome]][slot] += row.n
    return [
        Activity(
            name,
            since,
            tuple(series["handled"]),
            tuple(series["failed"]),
            tuple(series["parked"]),
        )
        for name, series in sorted(counts.items())
    ]


# -- queries ---------------------------------------------------------------------------------


def _find(
    connection: Connection,
    listener: type[Listener] | str | None,
    tag: str | None,
    states: tuple[str, ...] | None,
    since: dt.datetime | None,
    limit: int,
) -> list[Job]:
    from sqlalchemy import and_, func, select

    from listener.ledger import attempts, tags

    name = listener if isinstance(listener, str) or listener is None else listener.name()
    if tag is None:
        return _recent(connection, name, states, since, limit)
    candidates = select(attempts.c.message_id, attempts.c.listener).distinct()
    candidates = candidates.join(
        tags,
        and_(tags.c.message_id == attempts.c.message_id, tags.c.listener == attempts.c.listener),
    ).where(tags.c.tag == tag)
    if name is not None:
        candidates = candidates.where(attempts.c.listener == name)
    if since is not None:
        candidates = candidates.where(attempts.c.started_at >= since)
    chosen = candidates.subquery()
    ranked = (
        select(
            attempts.c.message_id,
            attempts.c.listener,
            attempts.c.outcome,
            func.coalesce(attempts.c.finished_at, attempts.c.started_at).label("at"),
            func.row_number()
            .over(
                partition_by=(attempts.c.message_id, attempts.c.listener),
                order_by=[column.desc() for column in _story_order()],
            )
            .label("rank"),
        )
        .join(
            chosen,
            and_(
                chosen.c.message_id == attempts.c.message_id,
                chosen.c.listener == attempts.c.listener,
            ),
        )
        .subquery()
    )
    latest = select(ranked.c.message_id, ranked.c.listener).where(ranked.c.rank == 1)
    if states is not None:
        outcomes = [outcome for outcome, state in _STATE_OF.items() if state in states]
        latest = latest.where(ranked.c.outcome.in_(outcomes))
    keys = connection.execute(latest.order_by(ranked.c.at.desc()).limit(limit)).all()
    if not keys:
        return []
    rows = connection.execute(
        attempts.select()
        .where(attempts.c.message_id.in_({key.message_id for key in keys}))
        .order_by(attempts.c.listener, *_story_order())
    ).all()
    wanted = {(key.message_id, key.listener) for key in keys}
    found = [job for job in _jobs(connection, rows) if (job.message_id, job.listener) in wanted]
    return sorted(found, key=lambda job: job.updated_at)


def _recent(
    connection: Connection,
    name: str | None,
    states: tuple[str, ...] | None,
    since: dt.datetime | None,
    limit: int,
) -> list[Job]:
    """The `limit` most recently active jobs, without a tag to narrow them down.

    Reads the newest records first (the primary key follows insertion), a few times `limit`
    of them, and widens the window only while it found too few jobs and rows remain: a
    query never ranks the whole table (seconds at a million rows). Past `_WIDEST` records it
    answers with what it found: narrow such a search down with a tag, a listener or `since`.
    """
    from sqlalchemy import select

    from listener.ledger import attempts

    outcomes = None
    if states is not None:
        outcomes = [outcome for outcome, state in _STATE_OF.items() if state in states]
    window = limit * 4
    while True:
        recent = select(attempts.c.message_id, attempts.c.listener)
        if name is not None:
            recent = recent.where(attempts.c.listener == name)
        if since is not None:
            recent = recent.where(attempts.c.started_at >= since)
        if outcomes is not None:
            recent = recent.where(attempts.c.outcome.in_(outcomes))
        keys = connection.execute(recent.order_by(attempts.c.id.desc()).limit(window)).all()
        wanted = {(key.message_id, key.listener) for key in keys}
        rows = connection.execute(
            attempts.select()
            .where(attempts.c.message_id.in_({message_id for message_id, _ in wanted}))
            .order_by(attempts.c.listener, *_story_order())
        ).all()
        found = [
            job
            for job in _jobs(connection, rows)
            if (job.message_id, job.listener) in wanted and (states is None or job.state in states)
        ]
        if len(found) >= limit or len(keys) < window or window >= _WIDEST:
            return sorted(found, key=lambda job: job.updated_at)[-limit:]
        window *= 4


def _story_order() -> list[Any]:
    """How a job's records follow each other: the publish first, then the attempts by when
    they started. Not by attempt number alone: a replayed message starts again at attempt 1,
    and its new attempts come after its parking. The number breaks ties between records of
    one moment."""
    from sqlalchemy import case

    from listener.ledger import attempts

    return [
        case((attempts.c.attempt == 0, 0), else_=1),
        attempts.c.started_at,
        attempts.c.attempt,
        attempts.c.id,
    ]


def _jobs(connection: Connection, rows: Sequence[Any]) -> list[Job]:
    from sqlalchemy import select

    from listener.ledger import tags

    by_job: dict[tuple[str, str], list[Any]] = {}
    for row in rows:
        by_job.setdefault((row.message_id, row.listener), []).append(row)
    if not by_job:
        return []
    tag_rows = connection.execute(
        select(tags.c.message_id, tags.c.listener, tags.c.tag)
        .where(tags.c.message_id.in_({message_id for message_id, _ in by_job}))
        .order_by(tags.c.tag)
    ).all()
    tags_of: dict[tuple[str, str], list[str]] = {}
    for tag_row in tag_rows:
        tags_of.setdefault((tag_row.message_id, tag_row.listener), []).append(tag_row.tag)
    silent = _silent_workers(connection, [rows[-1] for rows in by_job.values()])
    jobs = []
    for (message_id, listener), job_rows in by_job.items():
        attempts = tuple(_attempt(row) for row in job_rows)
        last = job_rows[-1]
        state = _STATE_OF.get(last.outcome, "retrying")
        jobs.append(
            Job(
                message_id,
                listener,
                last.queue,
                state,
                _where(state, last, silent),
                attempts,
                tuple(tags_of.get((message_id, listener), ())),
            )
        )
    return jobs


def _silent_workers(connection: Connection, last_rows: Sequence[Any]) -> set[tuple[str, int]]:
    """Of the workers running these jobs, those gone or silent for `LOST_AFTER`."""
    from sqlalchemy import and_, or_, select

    from listener.ledger import workers as table

    running = {(row.host, row.pid) for row in last_rows if row.outcome == "running"}
    if not running:
        return set()
    heard = connection.execute(
        select(table.c.host, table.c.pid).where(
            or_(*(and_(table.c.host == host, table.c.pid == pid) for host, pid in running)),
            table.c.seen_at >= dt.datetime.now(dt.UTC) - LOST_AFTER,
        )
    ).all()
    return running - {(row.host, row.pid) for row in heard}


def _attempt(row: Any) -> Attempt:
    return Attempt(
        row.attempt,
        row.outcome,
        row.host,
        row.pid,
        utc(row.started_at),
        utc(row.finished_at) if row.finished_at is not None else None,
        row.duration,
        row.next_queue,
        row.exception_type,
        row.exception_message,
        row.traceback,
        utc(row.due_at) if row.due_at is not None else None,
    )


def _where(state: str, last: Any, silent: set[tuple[str, int]]) -> str:
    if state == "handled":
        return "nowhere (acked)"
    if state == "running" and (last.host, last.pid) in silent:
        return (
            f"unknown: its worker, {last.host} pid {last.pid}, stopped reporting (if it died, "
            f"the broker gives the message to another worker from {last.queue})"
        )
    if state == "running":
        return f"being handled on {last.host} pid {last.pid}"
    if state == "pending":
        if last.due_at is not None and utc(last.due_at) > dt.datetime.now(dt.UTC):
            return f"the delay levels, due in {last.queue} at {utc(last.due_at).isoformat()}"
        return str(last.queue)
    return str(last.next_queue or last.queue)


# -- helpers ---------------------------------------------------------------------------------


def _states(state: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if state is None:
        return None
    states = (state,) if isinstance(state, str) else tuple(state)
    unknown = [name for name in states if name not in STATES]
    if unknown:
        raise ValueError(f"unknown state {unknown[0]!r}: use one of {', '.join(STATES)}")
    return states


def _moment(since: dt.datetime | dt.timedelta | None) -> dt.datetime | None:
    if isinstance(since, dt.timedelta):
        return dt.datetime.now(dt.UTC) - since
    return since


@contextlib.contextmanager
def _connection(engine: Engine | None) -> Iterator[Connection]:
    """A connection to `engine`, or to the configured database (disposed after)."""
    own = None
    if engine is None:
        settings = get_settings()
        if settings.database_url is None:
            raise ConfigurationError(
                "no database is configured: set AMQP_LISTENER_DATABASE_URL to read the ledger"
            )
        from listener.database import create_engine

        engine = own = create_engine(settings.database_url.get_secret_value())
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        if own is not None:
            own.dispose()
