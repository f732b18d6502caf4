"""The outbox: notify(session=) writes in the caller's transaction; the relay publishes what
committed, on PostgreSQL and SQLite, against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from support.proxy import TcpProxy
from support.waiting import eventually, wait_until

import listener
from listener import InvalidMessage, Listener, database
from listener.errors import ConfigurationError
from listener.outbox import dead_table, outbox_table
from listener.relay import Relay
from listener.settings import Settings


class Order(BaseModel):
    order_id: int


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = database.create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def shipper(unique: str, rabbit: Any) -> type[Listener]:
    """A listener whose queue exists (declared by hand), so published messages land there."""

    class Shipper(Listener):
        subscribes_to = f"{unique}.order_placed"
        queue = f"{unique}.shipper"

        def handle(self, message: Order) -> None: ...

    rabbit.declare_exchange(unique)
    rabbit.declare_queue(Shipper.queue, bind=(unique, "order_placed"))
    return Shipper


def relay_settings(settings: Settings, database_url: str, **changes: Any) -> Settings:
    return settings.with_database_url(database_url).model_copy(update=changes)


def relay_once(settings: Settings) -> Relay:
    relay = Relay(settings)

    async def once() -> None:
        try:
            await relay.run_once()
        finally:
            await relay._publisher.aclose()
            if relay._engine is not None:
                await relay._engine.dispose()

    asyncio.run(once())
    return relay


def waiting(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(sa.select(sa.func.count()).select_from(outbox_table)).scalar_one()
        )


def order_ids(messages: list[tuple[Any, bytes]]) -> list[int]:
    return [json.loads(body)["order_id"] for _properties, body in messages]


def test_a_rolled_back_transaction_publishes_nothing_and_a_committed_one_everything(
    engine: sa.Engine, shipper: type[Listener], settings: Settings, database_url: str, rabbit: Any
) -> None:
    with Session(engine) as session:
        shipper.notify(order_id=1, session=session)
        session.rollback()
    with Session(engine) as session, session.begin():
        first = shipper.notify(Order(order_id=2), session=session)
        more = shipper.notify_many([{"order_id": 3}, {"order_id": 4}], session=session)
        listener.publish(f"{shipper.exchange}.order_placed", {"order_id": 5}, session=session)

    relay = relay_once(relay_settings(settings, database_url))

    messages = rabbit.drain(shipper.queue)
    assert order_ids(messages) == [2, 3, 4, 5]
    assert [p.message_id for p, _ in messages][:3] == [first, *more]
    assert all(p.delivery_mode == 2 and p.content_type == "application/json" for p, _ in messages)
    assert relay.counts.published == 4
    assert waiting(engine) == 0


async def test_anotify_with_an_async_session_writes_in_its_transaction(
    database_url: str, shipper: type[Listener], settings: Settings, rabbit: Any
) -> None:
    engine = database.create_async_engine(database_url)
    try:
        async with AsyncSession(engine) as session:
            await shipper.anotify(order_id=1, session=session)
            await session.rollback()
        async with AsyncSession(engine) as session, session.begin():
            await shipper.anotify(order_id=2, session=session)
            await shipper.anotify_many([Order(order_id=3)], session=session)
            await listener.apublish(
                f"{shipper.exchange}.order_placed", {"order_id": 4}, session=session
            )
    finally:
        await engine.dispose()
    relay = Relay(relay_settings(settings, database_url))
    try:
        await relay.run_once()
    finally:
        await relay._publisher.aclose()
        assert relay._engine is not None
        await relay._engine.dispose()
    assert order_ids(rabbit.drain(shipper.queue)) == [2, 3, 4]


def test_a_message_that_does_not_fit_the_model_is_refused_and_nothing_is_written(
    engine: sa.Engine, shipper: type[Listener]
) -> None:
    with Session(engine) as session, session.begin():
        with pytest.raises(InvalidMessage, match="order_id"):
            shipper.notify(order_id="not a number", session=session)
        with pytest.raises(InvalidMessage):
            shipper.notify_many([{"order_id": 1}, {"nope": 2}], session=session)
    assert waiting(engine) == 0


def test_the_writer_needs_no_broker_and_no_database_setting(
    engine: sa.Engine, shipper: type[Listener], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://guest:guest@127.0.0.1:9/%2F")  # nothing listens
    monkeypatch.delenv("AMQP_LISTENER_DATABASE_URL", raising=False)
    with Session(engine) as session, session.begin():
        message_id = shipper.notify(order_id=7, session=session)
    with engine.connect() as connection:
        row = connection.execute(sa.select(outbox_table)).one()
    assert (row.message_id, row.exchange, row.routing_key) == (
        message_id,
        shipper.exchange,
        "order_placed",
    )
    assert json.loads(row.body) == {"order_id": 7}
    assert row.created_at is not None


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_database_without_db_upgrade_is_named_with_the_command_and_no_body(
    kind: str, shipper: type[Listener], tmp_path: Any, postgres_url: str
) -> None:
    from support.databases import scratch_postgres

    with contextlib.ExitStack() as stack:
        url = (
            f"sqlite:///{tmp_path}/bare.db"
            if kind == "sqlite"
            else stack.enter_context(scratch_postgres())
        )
        engine = database.create_engine(url)
        stack.callback(engine.dispose)
        with (
            Session(engine) as session,
            pytest.raises(ConfigurationError, match="amqp-listener db upgrade") as raised,
        ):
            shipper.notify(order_id=424242, session=session)
        assert "424242" not in str(raised.value)  # the statement's parameters stay out
        assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_an_async_session_given_to_the_sync_notify_is_refused_with_the_way_out(
    database_url: str, shipper: type[Listener]
) -> None:
    engine = database.create_async_engine(database_url)
    session = AsyncSession(engine)
    with pytest.raises(TypeError, match="anotify"):
        shipper.notify(order_id=1, session=session)  # type: ignore[arg-type]
    asyncio.run(engine.dispose())


def test_an_ordering_key_without_a_session_is_refused(shipper: type[Listener]) -> None:
    with pytest.raises(ValueError, match="session="):
        shipper.notify(order_id=1, ordering_key="customer-1")


def test_an_unroutable_row_goes_to_the_dead_table_and_never_blocks_the_rows_behind_it(
    engine: sa.Engine, shipper: type[Listener], settings: Settings, database_url: str, rabbit: Any
) -> None:
    with Session(engine) as session, session.begin():
        shipper.notify(order_id=1, session=session)
        listener.publish(f"{shipper.exchange}.nobody_listens", {"order_id": 2}, session=session)
        shipper.notify(order_id=3, session=session)

    relay = relay_once(relay_settings(settings, database_url))

    assert order_ids(rabbit.drain(shipper.queue)) == [1, 3]
    assert waiting(engine) == 0
    with engine.connect() as connection:
        dead = connection.execute(sa.select(dead_table)).one()
    assert dead.routing_key == "nobody_listens"
    assert "unroutable" in dead.reason
    assert relay.counts.dead == 1


def test_a_row_over_the_size_limit_goes_to_the_dead_table_with_the_reason(
    engine: sa.Engine, shipper: type[Listener], settings: Settings, database_url: str, rabbit: Any
) -> None:
    with Session(engine) as session, session.begin():
        shipper.notify(order_id=1, session=session)
        shipper.notify(order_id=2, session=session)
    # The limit was lowered after the rows were written (a later deploy, say).
    relay_once(relay_settings(settings, database_url, max_body_bytes=5))
    assert rabbit.drain(shipper.queue) == []
    with engine.connect() as connection:
        reasons = connection.execute(sa.select(dead_table.c.reason)).scalars().all()
    assert len(reasons) == 2
    assert all("too large" in reason for reason in reasons)


async def test_a_broker_outage_only_delays_the_rows(
    database_url: str, shipper: type[Listener], settings: Settings, rabbit: Any
) -> None:
    engine = database.create_engine(database_url)
    with TcpProxy() as proxy:
        proxy_url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
        relay = Relay(relay_settings(settings, database_url, connect_timeout=1).with_url(proxy_url))
        proxy.cut_after(0)
        running = asyncio.create_task(relay.run())
        with Session(engine) as session, session.begin():
            shipper.notify_many([{"order_id": n} for n in range(20)], session=session)
        await eventually(lambda: relay.counts.failures >= 2)  # it tried, and tries again
        assert waiting(engine) == 20
        assert rabbit.count(shipper.queue) == 0
        proxy.pass_through()
        await eventually(lambda: waiting(engine) == 0, timeout=20)
        relay.stop()
        await asyncio.wait_for(running, 10)
    engine.dispose()
    assert order_ids(rabbit.drain(shipper.queue)) == list(range(20))


async def test_two_relays_publish_each_ordering_key_in_commit_order(
    database_url: str, shipper: type[Listener], settings: Settings, rabbit: Any
) -> None:
    engine = database.create_engine(database_url)
    with Session(engine) as session, session.begin():
        for n in range(300):
            shipper.notify(order_id=n, session=session, ordering_key=f"customer-{n % 3}")
    engine.dispose()
    # Small batches, so that the two relays take turns many times.
    relays = [Relay(relay_settings(settings, database_url), batch_size=7) for _ in range(2)]
    running = [asyncio.create_task(relay.run()) for relay in relays]
    await eventually(lambda: sum(r.counts.published for r in relays) >= 300, timeout=30)
    for relay in relays:
        relay.stop()
    await asyncio.wait_for(asyncio.gather(*running), 15)
    published = order_ids(rabbit.drain(shipper.queue))
    assert sorted(published) == list(range(300))
    for key in range(3):
        of_key = [n for n in published if n % 3 == key]
        assert of_key == sorted(of_key)


def test_writers_of_one_ordering_key_wait_for_each_others_commit(
    postgres_url: str, shipper: type[Listener]
) -> None:
    engine = database.create_engine(postgres_url)
    with engine.begin() as connection:  # the session's database: what other tests left
        connection.execute(sa.delete(outbox_table))
    second_done = threading.Event()
    try:
        with Session(engine) as first, first.begin():
            first_id = shipper.notify(order_id=1, session=first, ordering_key="customer-1")

            def second_writer() -> None:
                with Session(engine) as second, second.begin():
                    shipper.notify(order_id=2, session=second, ordering_key="customer-1")
                second_done.set()

            thread = threading.Thread(target=second_writer)
            thread.start()
            wait_until(lambda: lock_waiters(engine) == 1, 10, "the second writer to wait")
            assert not second_done.is_set()
        thread.join(10)
        assert second_done.is_set()
        with engine.connect() as connection:
            ids = connection.execute(
                sa.select(outbox_table.c.message_id).order_by(outbox_table.c.id)
            ).scalars()
            assert next(ids) == first_id  # the first to commit has the smaller id
    finally:
        with engine.begin() as connection:
            connection.execute(sa.delete(outbox_table))
        engine.dispose()


def lock_waiters(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks JOIN pg_database ON pg_database.oid = database "
                    "WHERE locktype = 'advisory' AND NOT granted AND datname = current_database()"
                )
            ).scalar_one()
        )


async def test_a_row_for_a_missing_exchange_goes_dead_and_the_rows_behind_it_follow(
    database_url: str, shipper: type[Listener], settings: Settings, rabbit: Any
) -> None:
    engine = database.create_engine(database_url)
    with Session(engine) as session, session.begin():
        listener.publish(
            f"{shipper.exchange}_missing.order_placed", {"order_id": 0}, session=session
        )
        shipper.notify_many([{"order_id": n} for n in range(1, 4)], session=session)
    relay = Relay(relay_settings(settings, database_url))
    running = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: waiting(engine) == 0, timeout=20)
    finally:
        relay.stop()
        await asyncio.wait_for(running, 15)
    with engine.connect() as connection:
        reason = connection.execute(sa.select(dead_table.c.reason)).scalar_one()
    engine.dispose()
    assert "does not exist" in reason
    assert order_ids(rabbit.drain(shipper.queue)) == [1, 2, 3]


def test_run_with_outbox_and_no_database_exits_2_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from listener.cli import app

    monkeypatch.delenv("AMQP_LISTENER_DATABASE_URL", raising=False)
    result = CliRunner().invoke(app, ["run", "tests.apps.gated", "--outbox"])
    assert result.exit_code == 2
    assert "--outbox" in result.output
    assert "AMQP_LISTENER_DATABASE_URL" in result.output


def test_the_relay_takes_both_postgresql_url_forms(
    postgres_url: str, shipper: type[Listener], settings: Settings, rabbit: Any
) -> None:
    engine = database.create_engine(postgres_url)
    with engine.begin() as connection:  # the session's database: what other tests left
        connection.execute(sa.delete(outbox_table))
    explicit = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        for n, url in enumerate((postgres_url, explicit)):
            with Session(engine) as session, session.begin():
                shipper.notify(order_id=n, session=session)
            relay_once(relay_settings(settings, url))
    finally:
        engine.dispose()
    assert order_ids(rabbit.drain(shipper.queue)) == [0, 1]


def test_a_relay_batch_holds_at_most_1000_rows(
    engine: sa.Engine, shipper: type[Listener], settings: Settings, database_url: str, rabbit: Any
) -> None:
    with Session(engine) as session, session.begin():
        shipper.notify_many([{"order_id": n} for n in range(1500)], session=session)

    relay = relay_once(relay_settings(settings, database_url))

    assert relay.counts.batches == 1
    assert relay.counts.published == 1000
    assert waiting(engine) == 500
    assert order_ids(rabbit.drain(shipper.queue)) == list(range(1000))
    with pytest.raises(ConfigurationError, match="1 to 1000"):
        Relay(relay_settings(settings, database_url), batch_size=1001)


def test_the_outbox_lag_counts_the_rows_waiting_and_the_age_of_the_oldest(
    engine: sa.Engine, shipper: type[Listener], settings: Settings, database_url: str
) -> None:
    from listener._cli_outbox import describe_lag, outbox_lag

    with_db = relay_settings(settings, database_url)
    assert outbox_lag(with_db) == {"rows_waiting": 0, "oldest_age_seconds": None}
    with Session(engine) as session, session.begin():
        shipper.notify_many([{"order_id": 1}, {"order_id": 2}], session=session)
    with engine.begin() as connection:  # the oldest row was written a minute ago
        oldest = sa.select(sa.func.min(outbox_table.c.id)).scalar_subquery()
        connection.execute(
            outbox_table.update()
            .where(outbox_table.c.id == oldest)
            .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=60))
        )
    lag = outbox_lag(with_db)
    assert lag is not None
    assert lag["rows_waiting"] == 2
    assert 60 <= lag["oldest_age_seconds"] < 90
    assert describe_lag(lag).startswith("outbox: 2 row(s) waiting to be published, the oldest 6")


async def test_on_postgresql_a_commit_wakes_the_relay_at_once(
    postgres_url: str,
    shipper: type[Listener],
    settings: Settings,
    rabbit: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from listener import relay as relay_module

    monkeypatch.setattr(relay_module, "POLL_SECONDS", 120.0)  # only the NOTIFY is in time
    engine = database.create_engine(postgres_url)
    with engine.begin() as connection:  # the session's database: what other tests left
        connection.execute(sa.delete(outbox_table))
    relay = Relay(relay_settings(settings, postgres_url))
    running = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: listening(engine) == 1, timeout=10)
        await asyncio.sleep(1.0)  # its first look found nothing: it sleeps for the poll
        with Session(engine) as session, session.begin():
            shipper.notify(order_id=1, session=session)
        await eventually(lambda: relay.counts.published == 1, timeout=5)
    finally:
        relay.stop()
        await asyncio.wait_for(running, 15)
        engine.dispose()
    assert order_ids(rabbit.drain(shipper.queue)) == [1]


def listening(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query = 'LISTEN amqp_listener_outbox'"
                )
            ).scalar_one()
        )


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_the_relay_runs_on_the_event_loop_the_settings_choose(
    choice: str, settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """As the workers and notify_many() do: uvloop unless told otherwise."""
    pytest.importorskip("uvloop")
    from listener._cli_outbox import serve_relay

    loops: list[str] = []

    async def run(self: Relay) -> None:
        loops.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    monkeypatch.setattr(Relay, "run", run)
    chosen = relay_settings(settings, f"sqlite:///{tmp_path}/x.db", event_loop=choice)
    assert serve_relay(chosen) == 0
    assert loops == [choice]
