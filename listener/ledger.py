"""The job ledger's tables, and the statements that write them.

One row per attempt in `amqp_listener_attempts`, plus one row (attempt 0, outcome `pending`)
for a message notified by a process that has the database URL: who published it, and when.
A message's business keys (what `Listener.track()` returns) are rows of
`amqp_listener_tags`. Each worker process keeps one row of `amqp_listener_workers` fresh (its
heartbeat, and what it runs now). A stretch of time in which a process had to drop records
because the database was away is a row of `amqp_listener_gaps`: the ledger says "gap"
there instead of a false "did not run".

No bodies and no field values are ever written: exception messages and tracebacks are cut
to a bounded length.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    inspect,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from listener.recorder import COLUMNS, MAX_MESSAGE, AttemptRecord, Gap, WorkerBeat, utc
from listener.schema import create_tables, metadata, migration

__all__ = [
    "AttemptRecord",
    "Gap",
    "LostAttempt",
    "attempts",
    "gaps",
    "record_lost",
    "tags",
    "workers",
    "write_batch",
]

_Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only
_When = DateTime(timezone=True)

attempts = Table(
    "amqp_listener_attempts",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False),
    Column("listener", String(255), nullable=False),
    Column("queue", String(255), nullable=False),
    # 0 for the publish, 1 for the first attempt.
    Column("attempt", Integer, nullable=False),
    # pending (the publish), running, handled, retried, parked, returned, worker_lost
    Column("outcome", String(16), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", _When, nullable=False),
    Column("finished_at", _When),
    Column("duration", Float),  # seconds, measured with a monotonic clock
    # Where the message went: a delay queue, `<queue>.dead`, or back to `queue`.
    Column("next_queue", String(255)),
    Column("exception_type", String(255)),
    Column("exception_message", String(MAX_MESSAGE)),
    Column("traceback", Text),
    # A delayed message's publish (attempt 0): when it is due in the listener's queue.
    Column("due_at", _When),
    Index(None, "message_id", "started_at"),
    Index(None, "listener", "started_at"),
    Index(None, "outcome", "finished_at"),
    # Only delayed publishes have a due time: the index stays as small as they are few.
    Index(
        "ix_amqp_listener_attempts_due",
        "due_at",
        postgresql_where=text("due_at IS NOT NULL"),
        sqlite_where=text("due_at IS NOT NULL"),
    ),
)

tags = Table(
    "amqp_listener_tags",
    metadata,
    Column("tag", String(255), primary_key=True),
    Column("message_id", String(64), primary_key=True),
    Column("listener", String(255), primary_key=True),
    Column("created_at", _When, nullable=False),
    Index(None, "message_id"),
)

workers = Table(
    "amqp_listener_workers",
    metadata,
    Column("host", String(255), primary_key=True),
    Column("pid", Integer, primary_key=True),
    Column("listeners", Text, nullable=False),  # names, comma-separated
    Column("started_at", _When, nullable=False),
    Column("seen_at", _When, nullable=False),
    # JSON list of {"message_id", "listener", "since"}: what the worker runs now.
    Column("running", Text, nullable=False),
    Column("handled", Integer, nullable=False),
    Column("retried", Integer, nullable=False),
    Column("parked", Integer, nullable=False),
)

gaps = Table(
    "amqp_listener_gaps",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", _When, nullable=False),
    Column("ended_at", _When, nullable=False),
    Column("dropped", Integer, nullable=False),
    Index(None, "ended_at"),
)


@migration("ledger", 1, "attempts, tags, workers and gaps")
def _create_ledger(connection: Connection) -> None:
    create_tables(connection, [attempts, tags, workers, gaps])


@migration("ledger", 2, "the due time of a delayed message")
def _add_due_at(connection: Connection) -> None:
    # Step 1 creates the tables as they are now: a database made by it has the column.
    columns = {column["name"] for column in inspect(connection).get_columns(attempts.name)}
    if "due_at" not in columns:
        kind = attempts.c.due_at.type.compile(dialect=connection.dialect)
        connection.exec_driver_sql(f"ALTER TABLE {attempts.name} ADD COLUMN due_at {kind}")
    due = next(index for index in attempts.indexes if index.name == "ix_amqp_listener_attempts_due")
    due.create(connection, checkfirst=True)


# -- writing ---------------------------------------------------------------------------------


def write_batch(
    connection: Connection,
    records: Sequence[AttemptRecord],
    *,
    open_attempts: set[tuple[str, str, int, str, int, dt.datetime]],
    gap: Gap | None = None,
) -> set[tuple[str, str, int, str, int, dt.datetime]]:
    """Write `records` in order, in the caller's transaction.

    `open_attempts` are the keys of `running` rows written by earlier batches: a record that
    closes one of them updates it. Returns the new set of open keys (the caller keeps it only
    if the transaction commits).
    """
    still_open = set(open_attempts)
    finals: dict[tuple[str, str, int, str, int, dt.datetime], AttemptRecord] = {}
    starts: dict[tuple[str, str, int, str, int, dt.datetime], AttemptRecord] = {}
    tag_rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for record in records:
        key = record.key
        if record.outcome == "running":
            starts[key] = record
        else:
            finals[key] = record
        for tag in record.tags:
            tag_rows[(tag[:255], record.message_id, record.listener)] = {
                "tag": tag[:255],
                "message_id": record.message_id,
                "listener": record.listener,
                "created_at": record.started_at,
            }
    inserts = [record for key, record in starts.items() if key not in finals]
    updates = []
    for key, record in finals.items():
        if key in still_open:
            updates.append(record)
            still_open.discard(key)
        else:
            inserts.append(record)
    if inserts:
        insert_attempts(connection, inserts)
    if updates:
        _close_running(connection, updates)
    still_open.update(key for key in starts if key not in finals)
    insert_ignoring_duplicates(connection, tags, list(tag_rows.values()))
    if gap is not None:
        connection.execute(
            gaps.insert().values(
                host=gap.host,
                pid=gap.pid,
                started_at=gap.started_at,
                ended_at=gap.ended_at,
                dropped=gap.dropped,
            )
        )
    return still_open


def insert_attempts(connection: Connection, records: Sequence[AttemptRecord]) -> None:
    """Insert `records` as new rows, by the quickest way the driver has.

    The writer runs beside the worker's event loop and shares its interpreter lock: the
    fewer Python steps per row here, the more the handlers get. PostgreSQL takes the rows by
    COPY (psycopg encodes them in C); SQLite by the driver's own executemany.
    """
    if connection.dialect.name == "postgresql":
        names = ", ".join(COLUMNS)
        driver = connection.connection.driver_connection
        assert driver is not None
        with (
            driver.cursor() as cursor,
            cursor.copy(f"COPY {attempts.name} ({names}) FROM STDIN") as copy,
        ):
            for record in records:
                copy.write_row(record.values())
        return
    marks = ", ".join("?" * len(COLUMNS))
    statement = f"INSERT INTO {attempts.name} ({', '.join(COLUMNS)}) VALUES ({marks})"
    rows = []
    for record in records:
        row = list(record.values())
        row[_STARTED] = _sqlite_time(row[_STARTED])
        row[_FINISHED] = _sqlite_time(row[_FINISHED])
        row[_DUE] = _sqlite_time(row[_DUE])
        rows.append(tuple(row))
    connection.exec_driver_sql(statement, rows)


_STARTED = COLUMNS.index("started_at")
_FINISHED = COLUMNS.index("finished_at")
_DUE = COLUMNS.index("due_at")


def _sqlite_time(moment: dt.datetime | None) -> str | None:
    # As SQLAlchemy's SQLite DateTime stores them: naive UTC text with microseconds.
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def report_worker(connection: Connection, host: str, pid: int, beat: WorkerBeat) -> None:
    """Write this worker's heartbeat row: what it serves, runs now, and has done."""
    upsert(
        connection,
        workers,
        {
            "host": host,
            "pid": pid,
            "listeners": ",".join(beat.listeners),
            "started_at": beat.started_at,
            "seen_at": dt.datetime.now(dt.UTC),
            "running": json.dumps(beat.running),
            "handled": beat.handled,
            "retried": beat.retried,
            "parked": beat.parked,
        },
    )


def forget_worker(connection: Connection, host: str, pid: int) -> None:
    """Remove a worker's row: it stopped cleanly."""
    connection.execute(delete(workers).where(workers.c.host == host, workers.c.pid == pid))


def _close_running(connection: Connection, records: Sequence[AttemptRecord]) -> None:
    statement = (
        attempts.update()
        .where(
            attempts.c.message_id == bindparam("k_message_id"),
            attempts.c.listener == bindparam("k_listener"),
            attempts.c.attempt == bindparam("k_attempt"),
            attempts.c.host == bindparam("k_host"),
            attempts.c.pid == bindparam("k_pid"),
            attempts.c.started_at == bindparam("k_started_at"),
        )
        .values({name: bindparam(f"v_{name}") for name in _CLOSING_COLUMNS})
    )
    rows = []
    for record in records:
        row = record.row()
        keys = {f"k_{name}": row[name] for name in _KEY_COLUMNS}
        rows.append({**keys, **{f"v_{name}": row[name] for name in _CLOSING_COLUMNS}})
    connection.execute(statement, rows)


_KEY_COLUMNS = ("message_id", "listener", "attempt", "host", "pid", "started_at")
_CLOSING_COLUMNS = (
    "outcome",
    "finished_at",
    "duration",
    "next_queue",
    "exception_type",
    "exception_message",
    "traceback",
)


@dataclass(frozen=True, slots=True)
class LostAttempt:
    """An attempt that died with its worker process, as the supervisor knows it."""

    message_id: str
    listener: str
    queue: str
    host: str
    pid: int
    started_at: dt.datetime
    attempt: int | None = None


def record_lost(
    engine: Engine, entries: Iterable[LostAttempt], *, now: dt.datetime | None = None
) -> int:
    """Record each entry as a `worker_lost` attempt; returns how many were recorded.

    The `running` row the worker wrote for that attempt, if it got that far, becomes the
    `worker_lost` one; otherwise a new row is added. The dead worker leaves the workers
    view at once, rather than after 30 s of silence as busy with a message that another
    worker may run by then.
    """
    finished = now or dt.datetime.now(dt.UTC)
    count = 0
    with engine.begin() as connection:
        for entry in entries:
            forget_worker(connection, entry.host, entry.pid)
            running = attempts.c.outcome == "running"
            match = and_(
                attempts.c.message_id == entry.message_id,
                attempts.c.listener == entry.listener,
                attempts.c.host == entry.host,
                attempts.c.pid == entry.pid,
                running,
            )
            values = {
                "outcome": "worker_lost",
                "finished_at": finished,
                "duration": max(0.0, (finished - entry.started_at).total_seconds()),
                "next_queue": entry.queue,
                "exception_type": "WorkerLost",
                "exception_message": f"the worker process {entry.pid} on {entry.host} died",
            }
            updated = connection.execute(attempts.update().where(match).values(**values))
            if updated.rowcount == 0:
                connection.execute(
                    attempts.insert().values(
                        message_id=entry.message_id,
                        listener=entry.listener,
                        queue=entry.queue,
                        attempt=entry.attempt or _next_attempt(connection, entry),
                        host=entry.host,
                        pid=entry.pid,
                        started_at=entry.started_at,
                        **values,
                    )
                )
            count += 1
    return count


def _next_attempt(connection: Connection, entry: LostAttempt) -> int:
    last = connection.execute(
        select(attempts.c.attempt)
        .where(attempts.c.message_id == entry.message_id, attempts.c.listener == entry.listener)
        .order_by(attempts.c.attempt.desc())
        .limit(1)
    ).scalar()
    return (last or 0) + 1


def insert_ignoring_duplicates(
    connection: Connection, table: Table, rows: Sequence[dict[str, Any]]
) -> None:
    """Insert `rows`, skipping those whose primary key is already there."""
    if not rows:
        return
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(dialect.insert(table).on_conflict_do_nothing(), list(rows))


def upsert(connection: Connection, table: Table, row: dict[str, Any]) -> None:
    """Insert `row`, or update the row with its primary key."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(**row)
    keys = [column.name for column in table.primary_key.columns]
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=keys,
            set_={name: value for name, value in row.items() if name not in keys},
        )
    )


def prune(
    connection: Connection,
    *,
    handled_before: dt.datetime,
    failed_before: dt.datetime,
    batch: int = 500,
) -> int:
    """Delete one batch of expired messages, every record of each; returns how many.

    A message expires by its last record: at `handled_before` when it was handled, at
    `failed_before` otherwise (parked, or never finished). Small batches keep each
    transaction, and its locks, short; the caller repeats while something was deleted.
    """
    # Only messages that expire: a candidate that has to stay would come back first in every
    # batch, and hold up the pruning of those behind it for good.
    later = attempts.alias("later")
    handled = (
        select(attempts.c.message_id)
        .where(
            attempts.c.outcome == "handled",
            attempts.c.finished_at < handled_before,
            ~exists().where(
                later.c.message_id == attempts.c.message_id,
                or_(
                    later.c.outcome == "parked",
                    func.coalesce(later.c.finished_at, later.c.started_at) >= handled_before,
                ),
            ),
        )
        .limit(batch)
    )
    old = (
        select(attempts.c.message_id)
        .where(
            attempts.c.started_at < failed_before,
            ~exists().where(
                later.c.message_id == attempts.c.message_id,
                func.coalesce(later.c.finished_at, later.c.started_at) >= failed_before,
            ),
        )
        .limit(batch)
    )
    candidates = set(connection.execute(handled).scalars()) | set(connection.execute(old).scalars())
    connection.execute(delete(gaps).where(gaps.c.ended_at < failed_before))
    connection.execute(delete(workers).where(workers.c.seen_at < handled_before))
    if not candidates:
        return 0
    last = func.max(func.coalesce(attempts.c.finished_at, attempts.c.started_at))
    rows = connection.execute(
        select(
            attempts.c.message_id,
            last.label("last"),
            func.max(case((attempts.c.outcome == "handled", 1), else_=0)).label("handled"),
            func.max(case((attempts.c.outcome == "parked", 1), else_=0)).label("parked"),
        )
        .where(attempts.c.message_id.in_(candidates))
        .group_by(attempts.c.message_id)
    ).all()
    doomed = [
        row.message_id
        for row in rows
        if utc(row.last) < (handled_before if row.handled and not row.parked else failed_before)
    ]
    if doomed:
        connection.execute(delete(attempts).where(attempts.c.message_id.in_(doomed)))
        connection.execute(delete(tags).where(tags.c.message_id.in_(doomed)))
    return len(doomed)
