"""The orders example on SQLite and PostgreSQL: an order and its message commit together, the
listener always finds the order, ships it once and tells the customer through the outbox."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from support.waiting import eventually

from examples.orders.app import create_app
from examples.orders.listeners import ShipOrder, TellCustomer
from examples.orders.models import Base, Order, Shipment
from listener import database
from listener.outbox import outbox_table
from listener.relay import Relay
from listener.settings import Settings


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = database.create_engine(database_url)
    yield engine
    Base.metadata.drop_all(engine)  # the session's PostgreSQL database is shared
    engine.dispose()


@asynccontextmanager
async def client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            yield http


def count(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


async def test_an_order_and_its_message_commit_together_and_a_bad_one_writes_neither(
    engine: sa.Engine, database_url: str
) -> None:
    async with client(database_url) as http:
        placed = await http.post("/orders", json={"customer": "ada", "item": "tea", "quantity": 2})
        refused = await http.post("/orders", json={"customer": "bob", "item": "tea", "quantity": 0})
        shown = await http.get(f"/orders/{placed.json()['order_id']}")
    assert placed.status_code == 201
    assert refused.status_code == 422
    assert shown.json()["status"] == "placed"
    with engine.connect() as connection:
        rows = connection.execute(sa.select(outbox_table.c.message_id, outbox_table.c.routing_key))
        assert [tuple(row) for row in rows] == [(placed.json()["message_id"], "placed")]


async def test_the_listener_ships_the_order_once_and_the_customer_is_told(
    engine: sa.Engine, database_url: str, run_worker: Any, settings: Settings, rabbit: Any
) -> None:
    with_db = settings.with_database_url(database_url)
    async with (
        client(database_url) as http,
        run_worker(ShipOrder, TellCustomer, worker_settings=with_db),
    ):
        relay = Relay(with_db)
        relaying = asyncio.create_task(relay.run())
        try:
            placed = await http.post(
                "/orders", json={"customer": "ada", "item": "tea", "quantity": 2}
            )
            order_id = placed.json()["order_id"]
            await eventually(lambda: told(engine, order_id), timeout=20)
        finally:
            relay.stop()
            await asyncio.wait_for(relaying, 15)
    assert count(engine, Shipment.__table__) == 1  # type: ignore[arg-type]
    assert count(engine, outbox_table) == 0


def told(engine: sa.Engine, order_id: int) -> bool:
    with Session(engine) as session:
        order = session.get(Order, order_id)
        return (
            order is not None and order.status == "shipped" and order.customer_told_at is not None
        )


@pytest.mark.slow
def test_the_demo_runs_on_sqlite_and_on_postgresql(
    run_demo: Callable[..., subprocess.CompletedProcess[str]],
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    rabbit: Any,
) -> None:
    rabbit.track(ShipOrder)
    rabbit.track(TellCustomer)
    monkeypatch.delenv("AMQP_LISTENER_DATABASE_URL", raising=False)
    on_sqlite = run_demo("examples.orders.demo")
    assert on_sqlite.returncode == 0, on_sqlite.stdout + on_sqlite.stderr
    monkeypatch.setenv("AMQP_LISTENER_DATABASE_URL", postgres_url)
    on_postgres = run_demo("examples.orders.demo")
    engine = database.create_engine(postgres_url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    assert on_postgres.returncode == 0, on_postgres.stdout + on_postgres.stderr
    assert "outcome: as expected" in on_postgres.stdout
