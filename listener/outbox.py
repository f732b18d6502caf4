"""The transactional outbox: messages written in the caller's database transaction.

`notify(..., session=session)` validates the message as `notify()` does, then inserts one
row into `amqp_listener_outbox` through the caller's SQLAlchemy session, and returns the
message id at once. Nothing reaches the broker until the transaction commits; a rollback
takes the message with it. The relay (`listener.relay`) publishes what committed.

On PostgreSQL, two triggers created by `amqp-listener db upgrade` do the rest inside the
writing transaction, without a round trip of their own:

- a statement-level `NOTIFY amqp_listener_outbox`, delivered at commit, wakes the relays;
- a row with an `ordering_key` first takes a transaction-level advisory lock on that key and
  then draws its id, so that the ids of one key follow their commit order (writers of one
  key wait for each other's commit; writers of different keys never do).

On SQLite every write transaction holds the database's write lock, so ids follow commit
order already.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event

from listener import codec
from listener.errors import ConfigurationError
from listener.schema import create_tables, metadata, migration
from listener.settings import get_settings
from listener.tracing import inject_trace_context

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

__all__ = [
    "NOTIFY_CHANNEL",
    "awrite",
    "dead_row",
    "dead_table",
    "has_outbox",
    "lag",
    "lease_table",
    "outbox_table",
    "rows",
    "write",
]

#: The channel the writers' trigger notifies and the relays listen on.
NOTIFY_CHANNEL = "amqp_listener_outbox"

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite's rowid alias


def _message_columns() -> list[sa.Column[Any]]:
    """What an outbox row and a dead row both hold of a message."""
    return [
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("exchange", sa.String(255), nullable=False),
        sa.Column("routing_key", sa.String(255), nullable=False),
        sa.Column("ordering_key", sa.String(255), nullable=True),
        sa.Column("headers", sa.JSON(), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    ]


outbox_table = sa.Table(
    "amqp_listener_outbox",
    metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    *_message_columns(),
)

#: Rows the broker would not take (unroutable, too large), with the reason; never retried
#: by the relay, kept for an operator.
dead_table = sa.Table(
    "amqp_listener_outbox_dead",
    metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    *_message_columns(),
    sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Index("ix_amqp_listener_outbox_dead_message_id", "message_id"),
)

#: SQLite has no row locks: one relay at a time holds this lease, renewed every batch.
lease_table = sa.Table(
    "amqp_listener_outbox_lease",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("expires_at", sa.Float(), nullable=False),
)

#: Advisory lock classes (the first key of the two-key form): one for writers of an
#: ordering key, one for the relay publishing it.
WRITER_LOCK_CLASS = 0x0B0C
RELAY_LOCK_CLASS = 0x0B0D

_TRIGGERS = [
    f"""
CREATE OR REPLACE FUNCTION amqp_listener_outbox_order() RETURNS trigger AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({WRITER_LOCK_CLASS}, hashtext(NEW.ordering_key));
    NEW.id := nextval(pg_get_serial_sequence('amqp_listener_outbox', 'id'));
    RETURN NEW;
END $$ LANGUAGE plpgsql
""",
    "DROP TRIGGER IF EXISTS amqp_listener_outbox_order ON amqp_listener_outbox",
    """
CREATE TRIGGER amqp_listener_outbox_order BEFORE INSERT ON amqp_listener_outbox
FOR EACH ROW WHEN (NEW.ordering_key IS NOT NULL) EXECUTE FUNCTION amqp_listener_outbox_order()
""",
    f"""
CREATE OR REPLACE FUNCTION amqp_listener_outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
    RETURN NULL;
END $$ LANGUAGE plpgsql
""",
    "DROP TRIGGER IF EXISTS amqp_listener_outbox_notify ON amqp_listener_outbox",
    """
CREATE TRIGGER amqp_listener_outbox_notify AFTER INSERT ON amqp_listener_outbox
FOR EACH STATEMENT EXECUTE FUNCTION amqp_listener_outbox_notify()
""",
]
for _statement in _TRIGGERS:
    _ddl = sa.DDL(_statement)  # type: ignore[no-untyped-call]
    event.listen(outbox_table, "after_create", _ddl.execute_if(dialect="postgresql"))


@migration("outbox", 1, "the outbox, its dead table and the SQLite relay lease")
def _create(connection: sa.Connection) -> None:
    create_tables(connection, [outbox_table, dead_table, lease_table])


def rows(
    exchange: str,
    routing_key: str,
    bodies: Sequence[bytes],
    *,
    headers: dict[str, Any] | None,
    ordering_key: str | None,
) -> list[dict[str, Any]]:
    """The outbox rows for `bodies`, each with a fresh message id (checked for size first)."""
    limit = get_settings().max_body_bytes
    for body in bodies:
        codec.check_size(body, limit)
    if ordering_key is not None and not (isinstance(ordering_key, str) and ordering_key):
        raise ValueError(f"ordering_key must be a non-empty string, got {ordering_key!r}")
    stored = inject_trace_context(dict(headers) if headers else None) or None
    now = dt.datetime.now(dt.UTC)
    return [
        {
            "message_id": codec.new_message_id(),
            "exchange": exchange,
            "routing_key": routing_key,
            "ordering_key": ordering_key,
            "headers": stored,
            "body": body,
            "created_at": now,
        }
        for body in bodies
    ]


def write(
    session: Session | None,
    exchange: str,
    routing_key: str,
    bodies: Sequence[bytes],
    *,
    headers: dict[str, Any] | None = None,
    ordering_key: str | None = None,
) -> list[str]:
    """Insert a row per body through `session`, in its transaction; their message ids.

    Raises:
        TypeError: `session` is an AsyncSession (use `awrite`).
        ValueError: no session with an ordering key, a bad ordering key, or a body too large.
    """
    new_rows = rows(exchange, routing_key, bodies, headers=headers, ordering_key=ordering_key)
    session = _required(session)
    if _is_async(session):
        raise TypeError(
            "notify(session=...) got an AsyncSession: use `await Cls.anotify(..., session=...)` "
            "(or anotify_many, apublish) with an async session"
        )
    try:
        session.execute(sa.insert(outbox_table), new_rows)
    except sa.exc.DBAPIError as exc:
        _raise_if_no_outbox(exc)
        raise
    return [row["message_id"] for row in new_rows]


async def awrite(
    session: AsyncSession | Session | None,
    exchange: str,
    routing_key: str,
    bodies: Sequence[bytes],
    *,
    headers: dict[str, Any] | None = None,
    ordering_key: str | None = None,
) -> list[str]:
    """The asyncio twin of `write()`; a sync `Session` is accepted too."""
    new_rows = rows(exchange, routing_key, bodies, headers=headers, ordering_key=ordering_key)
    session = _required(session)
    try:
        if _is_async(session):
            await session.execute(sa.insert(outbox_table), new_rows)  # type: ignore[misc]
        else:
            session.execute(sa.insert(outbox_table), new_rows)
    except sa.exc.DBAPIError as exc:
        _raise_if_no_outbox(exc)
        raise
    return [row["message_id"] for row in new_rows]


def _raise_if_no_outbox(exc: sa.exc.DBAPIError) -> None:
    """A database that `db upgrade` never ran on: say so, without SQLAlchemy's text (it
    quotes the statement's parameters, the message bodies among them)."""
    original = exc.orig
    detail = str(original).strip().splitlines()[0] if str(original).strip() else ""
    if type(original).__name__ == "UndefinedTable" or "no such table" in detail:
        raise ConfigurationError(
            f"the outbox table {outbox_table.name!r} is not in the session's database "
            f"({detail}): run `amqp-listener db upgrade` with that database's URL "
            "(AMQP_LISTENER_DATABASE_URL or --database-url) first, then roll back this "
            "transaction and try again"
        ) from None


def dead_row(row: Any, reason: str, failed_at: dt.datetime) -> dict[str, Any]:
    """The `dead_table` row for an outbox `row` the broker would not take."""
    kept = {column.name: getattr(row, column.name) for column in _message_columns()}
    return {**kept, "failed_at": failed_at, "reason": reason}


def _required(session: Any) -> Any:
    if session is None:
        raise ValueError(
            "ordering_key is kept by the outbox: pass session=... (the transaction to write "
            "the message in) with it"
        )
    return session


def _is_async(session: Any) -> bool:
    return hasattr(session, "sync_session")


async def has_outbox(engine: AsyncEngine) -> bool:
    """Whether `db upgrade` created the outbox table in this database."""
    async with engine.connect() as connection:
        name = outbox_table.name
        return bool(await connection.run_sync(lambda sync: sa.inspect(sync).has_table(name)))


async def lag(engine: AsyncEngine) -> dict[str, Any] | None:
    """The outbox lag: rows waiting, and the age in seconds of the oldest (None when empty);
    None without an outbox table."""
    if not await has_outbox(engine):
        return None
    async with engine.connect() as connection:
        waiting, oldest = (
            await connection.execute(
                sa.select(sa.func.count(), sa.func.min(outbox_table.c.created_at)).select_from(
                    outbox_table
                )
            )
        ).one()
    age = None
    if oldest is not None:
        if oldest.tzinfo is None:  # SQLite keeps no zone: the writers store UTC
            oldest = oldest.replace(tzinfo=dt.UTC)
        age = max(0.0, (dt.datetime.now(dt.UTC) - oldest).total_seconds())
    return {"rows_waiting": int(waiting), "oldest_age_seconds": age}
