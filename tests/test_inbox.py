"""The inbox: an idempotent listener's side effects happen once per message id, however often
the broker delivers it; in a real worker, on the real broker, PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from support.waiting import eventually

from listener import Listener, ListenerDefinitionError, Retry, database
from listener.errors import ConfigurationError
from listener.inbox import Inbox, check_listeners, inbox_table, prune, retry_span
from listener.outbox import outbox_table
from listener.settings import Settings

charges = sa.Table(
    "test_charges",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.Integer, nullable=False),
)


class Placed(BaseModel):
    order_id: int


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = database.create_engine(database_url)
    charges.drop(engine, checkfirst=True)
    charges.create(engine)
    yield engine
    charges.drop(engine, checkfirst=True)
    engine.dispose()


def count(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def deliver_three_times(rabbit: Any, cls: type[Listener], order_id: int) -> str:
    """The same message (one id) published three times: what redeliveries look like."""
    message_id = uuid.uuid4().hex
    body = Placed(order_id=order_id).model_dump_json().encode()
    for _ in range(3):
        rabbit.publish(
            cls.exchange,
            cls.routing_key,
            body,
            message_id=message_id,
            content_type="application/json",
            delivery_mode=2,
        )
    return message_id


@pytest.fixture
def deliver_thrice(
    run_worker: Any, settings: Settings, database_url: str, rabbit: Any
) -> Callable[[type[Listener], int], Awaitable[Inbox]]:
    """`await deliver_thrice(Cls, order_id)`: one message id delivered three times to `Cls`
    in a worker, until all three are acked; the listener's inbox."""

    async def deliver(cls: type[Listener], order_id: int) -> Inbox:
        async with run_worker(
            cls, worker_settings=settings.with_database_url(database_url)
        ) as worker:
            deliver_three_times(rabbit, cls, order_id)
            await eventually(
                lambda: sum(c.counts["handled"] for c in worker.consumers) == 3, timeout=20
            )
            inbox: Inbox = worker.consumers[0].inbox
        return inbox

    return deliver


async def test_a_sync_handler_writes_its_side_effect_once_for_three_deliveries(
    engine: sa.Engine, unique: str, deliver_thrice: Any
) -> None:
    sessions: list[Any] = []

    class Charge(Listener):
        subscribes_to = f"{unique}.placed"
        queue = f"{unique}.charge"
        idempotent = True

        def handle(self, message: Placed, session: Session) -> None:
            sessions.append(type(session))
            session.execute(charges.insert().values(order_id=message.order_id))

    inbox = await deliver_thrice(Charge, 7)
    assert count(engine, charges) == 1
    assert inbox.duplicates == 2
    assert sessions == [Session]


async def test_an_async_handler_gets_an_async_session_and_writes_once(
    engine: sa.Engine, unique: str, deliver_thrice: Any
) -> None:
    class Charge(Listener):
        subscribes_to = f"{unique}.placed"
        queue = f"{unique}.charge"
        idempotent = True

        async def handle(self, message: Placed, session: AsyncSession) -> None:
            assert isinstance(session, AsyncSession)
            await session.execute(charges.insert().values(order_id=message.order_id))

    inbox = await deliver_thrice(Charge, 8)
    assert inbox.duplicates == 2
    assert count(engine, charges) == 1


async def test_a_failed_attempt_rolls_back_its_writes_and_the_retry_writes_once(
    engine: sa.Engine, unique: str, deliver_thrice: Any
) -> None:
    attempts: list[int] = []

    class Charge(Listener):
        subscribes_to = f"{unique}.placed"
        queue = f"{unique}.charge"
        idempotent = True
        retry_delays = (0.05,)

        def handle(self, message: Placed, session: Session) -> None:
            session.execute(charges.insert().values(order_id=message.order_id))
            attempts.append(message.order_id)
            if len(attempts) == 1:
                raise Retry(delay=0.05)

    await deliver_thrice(Charge, 9)
    assert len(attempts) == 2  # the failed attempt, then one that committed; no more
    assert count(engine, charges) == 1


async def test_a_handler_that_notifies_through_the_outbox_commits_both_once(
    engine: sa.Engine, unique: str, deliver_thrice: Any
) -> None:
    class Receipt(Listener):
        subscribes_to = f"{unique}.receipt"

        def handle(self, message: Placed) -> None: ...

    class Charge(Listener):
        subscribes_to = f"{unique}.placed"
        queue = f"{unique}.charge"
        idempotent = True

        def handle(self, message: Placed, session: Session) -> None:
            session.execute(charges.insert().values(order_id=message.order_id))
            Receipt.notify(order_id=message.order_id, session=session)

    await deliver_thrice(Charge, 10)
    assert count(engine, charges) == 1
    with engine.connect() as connection:
        rows = connection.execute(sa.select(outbox_table.c.routing_key)).scalars().all()
    assert rows == ["receipt"]


def test_an_idempotent_listener_whose_handle_takes_no_session_fails_at_import() -> None:
    with pytest.raises(ListenerDefinitionError, match=r"handle\(self, message, session\)"):

        class Charge(Listener):
            subscribes_to = "orders.placed"
            idempotent = True

            def handle(self, message: Placed) -> None: ...


def test_a_handle_that_takes_a_session_without_idempotent_fails_at_import() -> None:
    with pytest.raises(ListenerDefinitionError, match="idempotent = True"):

        class Charge(Listener):
            subscribes_to = "orders.placed"

            def handle(self, message: Placed, session: Session) -> None: ...


def test_an_idempotent_listener_without_a_database_refuses_to_start_naming_the_setting() -> None:
    class Charge(Listener):
        subscribes_to = "orders.placed"
        idempotent = True

        def handle(self, message: Placed, session: Session) -> None: ...

    with pytest.raises(ConfigurationError, match="AMQP_LISTENER_DATABASE_URL"):
        check_listeners([Charge], Settings(database_url=None))


def test_the_runner_warns_when_a_retry_span_outlasts_the_inbox_retention(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Slow(Listener):
        subscribes_to = "orders.placed"
        idempotent = True
        max_attempts = 3
        retry_delays = (3600,)
        timeout = 60

        def handle(self, message: Placed, session: Session) -> None: ...

    assert retry_span(Slow) == 2 * 3600 + 3 * 60
    with caplog.at_level(logging.WARNING, logger="listener.inbox"):
        check_listeners([Slow], Settings(database_url="sqlite:///x.db", inbox_retention_days=0.05))
        check_listeners([Slow], Settings(database_url="sqlite:///x.db"))
    assert len(caplog.records) == 1
    assert "Slow retries over up to 7380s" in caplog.records[0].getMessage()


def test_run_warns_at_start_up_of_a_retry_span_longer_than_the_retention(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from listener import runner

    class Slow(Listener):
        subscribes_to = "orders.placed"
        idempotent = True
        max_attempts = 2
        retry_delays = (86400,)

        def handle(self, message: Placed, session: Session) -> None: ...

    started: list[Any] = []
    monkeypatch.setattr(
        runner.supervisor, "supervise", lambda listeners, *_a, **_k: started.append(listeners) or 0
    )
    monkeypatch.setattr(runner.supervisor, "supported", lambda: True)
    settings = Settings(database_url="sqlite:///x.db", inbox_retention_days=0.5)
    with caplog.at_level(logging.WARNING, logger="listener.inbox"):
        assert runner.run([Slow], settings) == 0
    assert started == [[Slow]]  # the warning came before the workers, which still start
    assert "Slow retries over up to" in caplog.text
    assert "AMQP_LISTENER_INBOX_RETENTION_DAYS" in caplog.text


def test_pruning_deletes_ids_past_the_retention_in_batches_and_keeps_the_rest(
    engine: sa.Engine,
) -> None:
    now = dt.datetime.now(dt.UTC)
    old = now - dt.timedelta(days=8)
    with engine.begin() as connection:
        connection.execute(
            sa.insert(inbox_table),
            [{"listener": "a:B", "message_id": f"old{i}", "received_at": old} for i in range(25)]
            + [{"listener": "a:B", "message_id": "new", "received_at": now}],
        )
    assert prune(engine, 7, batch=10) == 25
    with engine.connect() as connection:
        assert connection.execute(sa.select(inbox_table.c.message_id)).scalars().all() == ["new"]


async def test_a_duplicate_arriving_while_the_first_runs_waits_and_is_acked_unrun(
    engine: sa.Engine, unique: str, deliver_thrice: Any
) -> None:
    runs: list[int] = []

    class Charge(Listener):
        subscribes_to = f"{unique}.placed"
        queue = f"{unique}.charge"
        idempotent = True
        concurrency = 4

        async def handle(self, message: Placed, session: AsyncSession) -> None:
            runs.append(message.order_id)
            await session.execute(charges.insert().values(order_id=message.order_id))
            await asyncio.sleep(0.3)  # the duplicates arrive meanwhile

    await deliver_thrice(Charge, 11)
    assert runs == [11]
    assert count(engine, charges) == 1


async def test_the_worker_counts_the_duplicates_it_acked_when_it_stops(
    engine: sa.Engine, unique: str, deliver_thrice: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class Charge(Listener):
        subscribes_to = f"{unique}.placed"
        idempotent = True

        def handle(self, message: Placed, session: Session) -> None: ...

    with caplog.at_level(logging.INFO, logger="listener.inbox"):
        await deliver_thrice(Charge, 12)
    assert "Charge: 2 duplicate deliveries acked without running handle() (inbox)" in caplog.text
