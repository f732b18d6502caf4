"""The inbox: an idempotent listener handles each message id once, atomically with its writes.

    class ChargeCard(Listener):
        subscribes_to = "orders.placed"
        idempotent = True

        def handle(self, message: OrderPlaced, session: Session) -> None:
            session.add(Charge(order_id=message.order_id))
            Receipt.notify(order_id=message.order_id, session=session)   # the outbox

For each delivery the worker opens a transaction on the framework's database
(`AMQP_LISTENER_DATABASE_URL`: a `Session`, or an `AsyncSession` for an `async def` handler)
and first inserts the row (listener, message id) into `amqp_listener_inbox`. If the row is
there already, the message was handled before: the delivery is acked without running
`handle()`, and counted. Otherwise `handle()` runs with the session, and the inbox row, the
handler's writes and any outbox rows commit together once it returns; if it raises, they
all roll back and the message is retried as usual. The ack follows the commit: a worker that
dies between the two gets the message again, finds the row, and acks it.

The row is inserted *before* the handler runs, so a second delivery of the same id that
arrives while the first is still running waits for the first's transaction on the unique
key, instead of running the handler twice.

Rows are kept `inbox_retention_days` (7 by default) and pruned in batches of 1,000, at most
once an hour per worker. A delivery of the same id after that runs again; so the retention
must exceed the longest time between a message's first and last attempt, which the runner
checks at start-up (`check_listeners`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from listener.errors import ConfigurationError
from listener.schema import create_tables, metadata, migration
from listener.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.sql.dml import ReturningInsert

    from listener.listener import Listener

__all__ = ["Inbox", "check_listeners", "inbox_table", "prune", "retry_span"]

log = logging.getLogger("listener.inbox")

#: Rows one pruning statement deletes: short transactions, no long lock on the table.
PRUNE_BATCH = 1000
#: Seconds between two prunings by one worker.
_PRUNE_EVERY = 3600.0

inbox_table = sa.Table(
    "amqp_listener_inbox",
    metadata,
    sa.Column("listener", sa.String(255), primary_key=True),
    sa.Column("message_id", sa.String(255), primary_key=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, index=True),
)


@migration("inbox", 1, "the idempotent listeners' handled message ids")
def _create(connection: sa.Connection) -> None:
    create_tables(connection, [inbox_table])


class Inbox:
    """One idempotent listener's inbox in a worker: wraps `handle()` per delivery."""

    def __init__(self, listener: type[Listener], settings: Settings) -> None:
        if settings.database_url is None:
            raise ConfigurationError(_no_database(listener))
        self.listener = listener
        self.settings = settings
        self.duplicates = 0
        self._name = listener.name()
        self._url = settings.database_url.get_secret_value()
        self._engine: sa.Engine | None = None
        self._async_engine: AsyncEngine | None = None
        self._lock = threading.Lock()
        self._pruned_at = 0.0

    def __repr__(self) -> str:
        return f"<Inbox {self.listener.__name__} duplicates={self.duplicates}>"

    @property
    def on_sqlite(self) -> bool:
        """Whether the database is SQLite."""
        from listener.database import normalize_url

        return normalize_url(self._url).get_backend_name() == "sqlite"

    async def aclose(self) -> None:
        """Close the database connections (the worker stopped); reopened if used again."""
        if self.duplicates:
            log.info(
                "%s: %d duplicate deliveries acked without running handle() (inbox)",
                self.listener.__name__,
                self.duplicates,
            )
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()
        async_engine, self._async_engine = self._async_engine, None
        if async_engine is not None:
            await async_engine.dispose()

    def bind(self, instance: Listener, message_id: str) -> Callable[[Any], Any]:
        """The callable the worker runs for this delivery in place of `instance.handle`."""
        if self.listener.is_async:
            return lambda value: self._run_async(instance, message_id, value)
        return lambda value: self._run_sync(instance, message_id, value)

    def _run_sync(self, instance: Listener, message_id: str, value: Any) -> Any:
        from sqlalchemy.orm import Session

        with Session(self._sync_engine()) as session, session.begin():
            inserted = session.execute(self._record(session.get_bind(), message_id))
            if inserted.first() is None:
                self._duplicate(message_id)
                return None
            result = instance.handle(value, session)
        self._maybe_prune()
        return result

    async def _run_async(self, instance: Listener, message_id: str, value: Any) -> Any:
        from sqlalchemy.ext.asyncio import AsyncSession

        engine = self._async()
        async with AsyncSession(engine) as session, session.begin():
            inserted = await session.execute(self._record(engine.sync_engine, message_id))
            if inserted.first() is None:
                self._duplicate(message_id)
                return None
            handled: Awaitable[Any] = instance.handle(value, session)
            result = await handled
        self._maybe_prune()
        return result

    def _record(self, bind: Any, message_id: str) -> ReturningInsert[tuple[str]]:
        """INSERT the (listener, message id) row unless it is there already."""
        values = {
            "listener": self._name,
            "message_id": message_id,
            "received_at": dt.datetime.now(dt.UTC),
        }
        if bind.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            statement: sa.Insert = pg_insert(inbox_table).values(values).on_conflict_do_nothing()
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            statement = sqlite_insert(inbox_table).values(values).on_conflict_do_nothing()
        # RETURNING says whether the row was written: rowcount is not reliable here (-1 from
        # some drivers through a Session).
        return statement.returning(inbox_table.c.message_id)

    def _duplicate(self, message_id: str) -> None:
        self.duplicates += 1
        log.info(
            "%s: message %s was handled before (inbox); acked without running handle()",
            self.listener.__name__,
            message_id,
        )

    def _sync_engine(self) -> sa.Engine:
        with self._lock:
            if self._engine is None:
                from listener.database import create_engine

                engine = create_engine(self._url)
                if engine.dialect.name == "sqlite":
                    # Take the write lock at BEGIN: the first statement writes anyway.
                    engine = engine.execution_options(sqlite_begin="IMMEDIATE")
                self._engine = engine
            return self._engine

    def _async(self) -> AsyncEngine:
        if self._async_engine is None:
            from listener.database import create_async_engine

            engine = create_async_engine(self._url)
            if engine.dialect.name == "sqlite":
                engine = engine.execution_options(sqlite_begin="IMMEDIATE")
            self._async_engine = engine
        return self._async_engine

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._pruned_at and now - self._pruned_at < _PRUNE_EVERY:
                return
            self._pruned_at = now
        threading.Thread(target=self._prune, name="amqp-listener-inbox-prune", daemon=True).start()

    def _prune(self) -> None:
        from listener.database import create_engine

        # An engine of its own, closed here: the worker may close its own meanwhile.
        engine = create_engine(self._url, poolclass=sa.NullPool)
        try:
            removed = prune(engine, self.settings.inbox_retention_days)
        except Exception as exc:  # pruning is housekeeping: never a delivery's failure
            log.warning("pruning the inbox failed (%s); trying again in an hour", exc)
            return
        finally:
            engine.dispose()
        if removed:
            log.info(
                "inbox: pruned %d message id(s) older than %g days",
                removed,
                self.settings.inbox_retention_days,
            )


def prune(engine: sa.Engine, retention_days: float, *, batch: int = PRUNE_BATCH) -> int:
    """Delete inbox rows older than `retention_days`, `batch` rows per transaction; how many."""
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=retention_days)
    table = inbox_table.c
    removed = 0
    while True:
        oldest = (
            sa.select(table.listener, table.message_id)
            .where(table.received_at < cutoff)
            .limit(batch)
        )
        with engine.begin() as connection:
            done = connection.execute(
                sa.delete(inbox_table).where(
                    sa.tuple_(table.listener, table.message_id).in_(oldest.subquery().select())
                )
            ).rowcount
        removed += done
        if done < batch:
            return removed


def retry_span(listener: type[Listener]) -> float:
    """Seconds from a message's first delivery to the end of its last attempt, at most: the
    retry delays plus every attempt's time-out."""
    delays = listener.retry_delays or (0.0,)
    waits = [delays[min(i, len(delays) - 1)] for i in range(listener.max_attempts - 1)]
    return sum(waits) + listener.timeout * listener.max_attempts


def check_listeners(listeners: Sequence[type[Listener]], settings: Settings) -> None:
    """At start-up: every idempotent listener needs the database, and a retention longer than
    its longest retry span (warned, as a redelivery after it would run again).

    Raises:
        ConfigurationError: an idempotent listener and no database URL.
    """
    retention = settings.inbox_retention_days * 86400
    for cls in listeners:
        if not getattr(cls, "idempotent", False):
            continue
        if settings.database_url is None:
            raise ConfigurationError(_no_database(cls))
        span = retry_span(cls)
        if span > retention:
            log.warning(
                "%s retries over up to %.0fs, longer than the inbox keeps message ids (%gd, "
                "AMQP_LISTENER_INBOX_RETENTION_DAYS): a late retry of a message handled "
                "before would run again",
                cls.__name__,
                span,
                settings.inbox_retention_days,
            )


def _no_database(listener: type[Listener]) -> str:
    return (
        f"{listener.__name__} is idempotent: it needs the database. Set "
        "AMQP_LISTENER_DATABASE_URL (or --database-url) and run `amqp-listener db upgrade`"
    )
