"""The outbox relay: publishes committed outbox rows with confirms, then deletes them.

Run it alone (`amqp-listener relay`) or beside the workers (`amqp-listener run ... --outbox`).
Each row carries its exchange and routing key, so the relay imports no application code.

One batch, at most `batch_size` (1,000) rows, oldest id first:

1. **Claim.** On PostgreSQL, `DELETE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)
   RETURNING`, in a transaction that stays open while the batch is published: relays
   running at once take disjoint rows, and a relay that dies gives its rows back when its
   connection drops (its delete never committed). A row with an `ordering_key` is claimed
   only together with a transaction-level advisory lock on that key, so two relays never
   publish one key at once. On SQLite, which has no row locks, one relay at a time holds a
   lease (a row in `amqp_listener_outbox_lease`, `LEASE_SECONDS` long, renewed with each
   batch); the others wait for it to lapse, or take it at once from a dead relay of the
   same host.
2. **Publish** every row of the batch before waiting for any confirm (pipelined), in id
   order, on one channel.
3. **Settle** in one transaction: a confirmed row is deleted (on PostgreSQL, the claim's
   commit does it); a row the broker will not take (returned unroutable, its exchange
   missing, or larger than `max_body_bytes`) moves to `amqp_listener_outbox_dead` with the
   reason; any other failure (a nack, a lost connection, a late confirm) leaves the row for
   the next batch. A relay killed between publishing and this commit publishes its batch
   again: duplicates, at most one batch per crash, never a loss. Consumers that must not
   see a message twice use the inbox.

Order: the rows of one `ordering_key` are published in the order their transactions
committed. Rows without one are published in id order by each relay, which is roughly the
order of their INSERTs; relays running at once interleave them, so no order is promised
across messages without a key.

Waking up: on PostgreSQL the relay LISTENs on `outbox.NOTIFY_CHANNEL`, which the writers'
trigger notifies at commit, and polls every `POLL_SECONDS` (1 s) as well, because a
notification sent while the listening connection was down is lost. SQLite cannot notify
another process, so the relay polls every `SQLITE_POLL_SECONDS` (0.2 s): a poll is one
indexed read of a local file in WAL mode, which never waits for and never blocks a writer,
so it costs little while keeping the commit-to-publish latency to a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from listener import _outgoing, database, outbox
from listener import delay as _delay
from listener._aiormq_backend import AiormqBackend
from listener._outgoing import Sending
from listener.errors import BrokerError, ConfigurationError, PublishError, Unroutable
from listener.settings import Settings

if TYPE_CHECKING:
    import aiormq.abc
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["BATCH_SIZE", "Relay", "RelayCounts"]

log = logging.getLogger("listener.relay")

#: The most rows one batch publishes: also the most duplicates one relay crash can cause.
BATCH_SIZE = 1000
#: Fallback poll on PostgreSQL, for notifications lost while not listening.
POLL_SECONDS = 1.0
#: Poll on SQLite (see the module docstring for why this often).
SQLITE_POLL_SECONDS = 0.2
#: How long a SQLite relay's lease lasts unless renewed: longer than a batch may take. A
#: relay of the same host that died frees it at once.
LEASE_SECONDS = 30.0
#: Back-off after a failure to reach the broker or the database, doubled up to the cap.
_FIRST_BACKOFF = 0.5
_BACKOFF_CAP = 15.0

_COLUMNS = outbox.outbox_table.c


@dataclass(slots=True)
class RelayCounts:
    """What a relay did since it started."""

    published: int = 0
    dead: int = 0
    deferred: int = 0
    batches: int = 0
    failures: int = 0


class Relay:
    """Publishes what the outbox holds until `stop()` is called (or SIGTERM, via the CLI).

    Example:
        relay = Relay(settings)            # settings.database_url must be set
        await relay.run()                  # returns after stop(), once its batch is done
    """

    def __init__(self, settings: Settings, *, batch_size: int = BATCH_SIZE) -> None:
        if settings.database_url is None:
            raise ConfigurationError(
                "the relay needs the database: set AMQP_LISTENER_DATABASE_URL or pass "
                "--database-url"
            )
        if not 1 <= batch_size <= BATCH_SIZE:
            raise ConfigurationError(f"batch_size must be from 1 to {BATCH_SIZE}, not {batch_size}")
        self.settings = settings
        self.batch_size = batch_size
        self.counts = RelayCounts()
        self._url = settings.database_url.get_secret_value()
        self._engine: AsyncEngine | None = None
        self._publisher = AiormqBackend(settings)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._transient: Exception | None = None
        self._checked = False  # the outbox table exists
        self._postgres = database.normalize_url(self._url).get_backend_name() == "postgresql"

    def __repr__(self) -> str:
        c = self.counts
        state = " stopping" if self._stopping.is_set() else ""
        return (
            f"<Relay published={c.published} dead={c.dead} deferred={c.deferred} "
            f"batches={c.batches} failures={c.failures}{state}>"
        )

    def stop(self) -> None:
        """Stop after the batch under way (safe from a signal handler on the loop)."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Relay until `stop()`; a broker or database outage only delays the rows."""
        self._engine = self._make_engine()
        listening = (
            asyncio.create_task(self._listen(), name="outbox-listen") if self._postgres else None
        )
        poll = POLL_SECONDS if self._postgres else SQLITE_POLL_SECONDS
        backoff = _FIRST_BACKOFF
        log.info(
            "outbox relay started: database %s, broker %s, %s",
            self.settings.redacted_database_url,
            self.settings.redacted_url,
            "LISTEN/NOTIFY and a 1s poll" if self._postgres else f"a {poll:g}s poll",
        )
        try:
            while not self._stopping.is_set():
                try:
                    done = await self.run_once()
                except (BrokerError, PublishError, sa.exc.SQLAlchemyError, OSError) as exc:
                    self.counts.failures += 1
                    wait = backoff * random.uniform(0.8, 1.2)
                    log.warning(
                        "outbox relay: %s; the rows wait, retrying in %.1fs",
                        self._describe(exc),
                        wait,
                    )
                    backoff = min(backoff * 2, _BACKOFF_CAP)
                    await self._sleep(wait)
                    continue
                backoff = _FIRST_BACKOFF
                if done < self.batch_size:  # a full batch means more may be waiting
                    await self._sleep(poll)
        finally:
            if listening is not None:
                listening.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listening
            await self._publisher.aclose()
            await self._engine.dispose()
            log.info("outbox relay stopped: %r", self)

    async def run_once(self) -> int:
        """Publish one batch; the number of rows it settled (published or moved to dead).

        Raises:
            BrokerError: the broker cannot be reached (nothing was claimed).
            sqlalchemy.exc.SQLAlchemyError: the database failed (nothing was deleted).
        """
        if self._engine is None:
            self._engine = self._make_engine()
        if not self._checked:
            if not await outbox.has_outbox(self._engine):
                raise ConfigurationError(
                    f"the database {self.settings.redacted_database_url} has no outbox table: "
                    "run `amqp-listener db upgrade` first"
                )
            self._checked = True
        channel = await self._publisher.underlay()  # connect before claiming anything
        if self._postgres:
            return await self._batch_postgres(channel)
        return await self._batch_sqlite(channel)

    def _make_engine(self) -> AsyncEngine:
        if not self._postgres:
            return database.create_async_engine(self._url, pool_size=2)
        # No ping per checkout (a round trip per batch): a dead connection fails the batch,
        # which is retried. The batch's deletes need not wait for the disk: lost in a server
        # crash, they only mean the rows are published again, as after a relay crash.
        return database.create_async_engine(
            self._url,
            pool_size=2,
            pool_pre_ping=False,
            connect_args={"options": "-c synchronous_commit=off"},
        )

    # -- PostgreSQL ---------------------------------------------------------------------

    async def _batch_postgres(self, channel: aiormq.abc.AbstractChannel) -> int:
        """Claim by deleting, in a transaction held open while the batch is published: the
        commit then settles the batch without a statement of its own, and a relay that dies
        rolls the delete back. If some rows failed for a passing reason, the whole claim is
        rolled back, and only the rows that are done are deleted again."""
        assert self._engine is not None
        claim = sa.text(
            "DELETE FROM amqp_listener_outbox WHERE id IN (SELECT id FROM amqp_listener_outbox "
            "WHERE ordering_key IS NULL "
            "OR pg_try_advisory_xact_lock(:lock_class, hashtext(ordering_key)) "
            "ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED) "
            "RETURNING id, message_id, exchange, routing_key, ordering_key, headers, body, "
            "created_at"
        ).columns(headers=sa.JSON())
        async with self._engine.connect() as connection:
            async with connection.begin() as transaction:
                claimed = await connection.execute(
                    claim, {"lock_class": outbox.RELAY_LOCK_CLASS, "limit": self.batch_size}
                )
                rows = sorted(claimed.all(), key=lambda row: row.id)  # RETURNING has no order
                if not rows:
                    return 0
                outcomes = await self._publish(channel, rows)
                if not any(isinstance(fate, Exception) for fate in outcomes):
                    return await self._settle(connection, rows, outcomes, deleted=True)
                await transaction.rollback()
            async with connection.begin():
                settled = await self._settle(connection, rows, outcomes, deleted=False)
        await self._raise_transient()
        return settled

    # -- SQLite -------------------------------------------------------------------------

    async def _batch_sqlite(self, channel: aiormq.abc.AbstractChannel) -> int:
        assert self._engine is not None
        async with self._engine.connect() as connection:
            # A read first: an idle poll takes no write lock.
            waiting = (await connection.execute(sa.select(_COLUMNS.id).limit(1))).first()
            await connection.rollback()
            if waiting is None or not await self._take_lease():
                return 0
            select = sa.select(*_COLUMNS).order_by(_COLUMNS.id).limit(self.batch_size)
            rows = (await connection.execute(select)).all()
            await connection.rollback()
        if not rows:
            return 0
        outcomes = await self._publish(channel, rows)  # no transaction open meanwhile
        async with self._writing() as writing:
            settled = await self._settle(writing, rows, outcomes)
        await self._raise_transient()
        return settled

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """A SQLite transaction that holds the write lock from its BEGIN."""
        assert self._engine is not None
        async with self._engine.connect() as connection:
            writing = await connection.execution_options(sqlite_begin="IMMEDIATE")
            async with writing.begin():
                yield writing

    async def _take_lease(self) -> bool:
        """Hold the SQLite relay lease: free, lapsed, ours already, or left by a relay of
        this host that died (SQLite lives on one host, so its processes can be checked)."""
        lease = outbox.lease_table
        now = time.time()
        async with self._writing() as writing:
            row = (
                await writing.execute(
                    sa.select(lease.c.holder, lease.c.expires_at).where(lease.c.name == "relay")
                )
            ).first()
            if row is not None and not (
                row.holder == self._holder or row.expires_at < now or _gone(row.holder)
            ):
                return False
            values = {"holder": self._holder, "expires_at": now + LEASE_SECONDS}
            if row is None:
                await writing.execute(sa.insert(lease).values(name="relay", **values))
            else:
                await writing.execute(lease.update().where(lease.c.name == "relay").values(values))
        return True

    # -- both -----------------------------------------------------------------------------

    async def _publish(
        self, channel: aiormq.abc.AbstractChannel, rows: Sequence[sa.Row[Any]]
    ) -> list[str | Exception | None]:
        """Each row's fate: None (confirmed), a reason (dead), or the transient error."""
        limit = self.settings.max_body_bytes
        outcomes: list[str | Exception | None] = [None] * len(rows)
        sent: list[int] = []
        batch: list[Sending] = []
        for index, row in enumerate(rows):
            if len(row.body) > limit:
                outcomes[index] = (
                    f"too large: the body is {len(row.body)} bytes, over the {limit} byte "
                    "limit (setting max_body_bytes)"
                )
                continue
            sent.append(index)
            batch.append(_sending(row))
        errors = await self._publisher.send_batch(batch, channel)
        for index, error in zip(sent, errors, strict=True):
            if error is not None:
                outcomes[index] = str(error) if _refused(error, rows[index]) else error
        return outcomes

    async def _settle(
        self,
        connection: AsyncConnection,
        rows: Sequence[sa.Row[Any]],
        outcomes: Sequence[str | Exception | None],
        *,
        deleted: bool = False,
    ) -> int:
        """Record the batch's fates in `connection`'s transaction: the dead rows to their
        table, and, unless the claim `deleted` them already, delete the rows that are done."""
        confirmed = [row.id for row, fate in zip(rows, outcomes, strict=True) if fate is None]
        dead = [
            (row, fate) for row, fate in zip(rows, outcomes, strict=True) if isinstance(fate, str)
        ]
        transient = [fate for fate in outcomes if isinstance(fate, Exception)]
        now = dt.datetime.now(dt.UTC)
        if dead:
            await connection.execute(
                sa.insert(outbox.dead_table),
                [outbox.dead_row(row, reason, now) for row, reason in dead],
            )
            for row, reason in dead:
                log.error(
                    "outbox message %s to %s.%s moved to amqp_listener_outbox_dead: %s",
                    row.message_id,
                    row.exchange,
                    row.routing_key,
                    reason,
                )
        gone = confirmed + [row.id for row, _ in dead]
        if not deleted:
            await self._delete(connection, gone)
        self.counts.batches += 1
        self.counts.published += len(confirmed)
        self.counts.dead += len(dead)
        self.counts.deferred += len(transient)
        self._transient = transient[0] if transient else None
        return len(gone)

    async def _delete(self, connection: AsyncConnection, ids: list[int]) -> None:
        if self._postgres:  # one array parameter, not a thousand
            await connection.execute(
                sa.text("DELETE FROM amqp_listener_outbox WHERE id = ANY(:ids)"), {"ids": ids}
            )
            return
        for start in range(0, len(ids), 500):  # within SQLite's limit on parameters
            chunk = ids[start : start + 500]
            await connection.execute(sa.delete(outbox.outbox_table).where(_COLUMNS.id.in_(chunk)))

    async def _raise_transient(self) -> None:
        """After the batch committed: a row that failed for a passing reason is kept for the
        next batch, after a back-off, on a new connection (the channel is likely gone)."""
        error, self._transient = self._transient, None
        if error is not None:
            await self._publisher.aclose()
            raise error if isinstance(error, PublishError) else PublishError(str(error))

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, sa.exc.SQLAlchemyError):
            return database.describe_error(exc, self._url)
        return str(exc)

    # -- waiting --------------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _listen(self) -> None:
        """Set the wake-up event on every NOTIFY; reconnect when the connection drops."""
        import psycopg

        conninfo = (
            database.normalize_url(self._url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False)
        )
        backoff = _FIRST_BACKOFF
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True
                ) as connection:
                    await connection.execute(f"LISTEN {outbox.NOTIFY_CHANNEL}")
                    backoff = _FIRST_BACKOFF
                    self._wake.set()  # anything committed while not listening
                    async for _ in connection.notifies():
                        self._wake.set()
            except psycopg.Error as exc:
                log.warning(
                    "outbox relay: listening for commits failed (%s); polling every %gs meanwhile",
                    type(exc).__name__,
                    POLL_SECONDS,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_CAP)


def _refused(error: PublishError, row: sa.Row[Any]) -> bool:
    """Whether the broker refused this row for good (it goes to the dead table).

    A returned message is refused alone. A missing exchange closes the whole channel, and
    every row still waiting for its confirm fails with the same error: only the rows for
    that exchange are refused; the others are retried with the next batch.
    """
    if not isinstance(error, Unroutable):
        return False
    text = str(error)
    return "does not exist" not in text or f"exchange {row.exchange!r} does not exist" in text


def _gone(holder: str) -> bool:
    """Whether `holder` (`host:pid:token`) names a process of this host that has ended."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _sending(row: sa.Row[Any]) -> Sending:
    """Where and what the relay publishes for `row`: a row due later waits in the delay
    levels for the time still left from its commit. Errors name the row's own address."""
    exchange, routing_key, headers = _delay.relay_route(row.exchange, row.routing_key, row.headers)
    message = _outgoing.relayed(row.body, row.message_id, row.created_at, headers)
    return exchange, routing_key, message, (row.exchange, row.routing_key)
