"""The test kit with the outbox and the inbox: a MemoryBroker given the database relays what
committed inline, so a test commits and then joins; idempotent listeners get their session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from listener import Listener, Unroutable, database
from listener.outbox import dead_table, outbox_table
from listener.testing import MemoryBroker

shipments = sa.Table(
    "test_kit_shipments",
    sa.MetaData(),
    sa.Column("order_id", sa.Integer, primary_key=True),
)


class Placed(BaseModel):
    order_id: int


class Ship(Listener):
    subscribes_to = "kit_orders.placed"
    idempotent = True

    def handle(self, message: Placed, session: Session) -> None:
        session.execute(shipments.insert().values(order_id=message.order_id))
        Shipped.notify(order_id=message.order_id, session=session)


class Shipped(Listener):
    subscribes_to = "kit_orders.shipped"

    def handle(self, message: Placed) -> None: ...


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = database.create_engine(database_url)
    shipments.create(engine)
    yield engine
    shipments.drop(engine)
    engine.dispose()


def test_join_relays_what_committed_and_nothing_that_rolled_back(
    engine: sa.Engine, database_url: str
) -> None:
    with MemoryBroker(Ship, Shipped, database_url=database_url) as broker:
        with Session(engine) as session:
            Ship.notify(order_id=1, session=session)
            session.rollback()
        with Session(engine) as session, session.begin():
            Ship.notify(order_id=2, session=session)
        broker.join()
    assert broker.handled(Ship) == [Placed(order_id=2)]
    assert broker.handled(Shipped) == [Placed(order_id=2)]  # the handler's own outbox row
    with engine.connect() as connection:
        assert connection.execute(sa.select(shipments.c.order_id)).scalars().all() == [2]
        assert (
            connection.execute(sa.select(sa.func.count()).select_from(outbox_table)).scalar() == 0
        )


def test_a_message_delivered_twice_to_an_idempotent_listener_is_handled_once(
    engine: sa.Engine, database_url: str
) -> None:
    with MemoryBroker(Ship, Shipped, database_url=database_url) as broker:
        for _ in range(2):
            broker.publish_raw("kit_orders.placed", b'{"order_id": 3}', message_id="same-id")
        broker.join()
    assert len(broker.handled(Ship)) == 2  # both acked...
    with engine.connect() as connection:  # ...one shipped
        assert connection.execute(sa.select(shipments.c.order_id)).scalars().all() == [3]
    assert len(broker.handled(Shipped)) == 1


async def test_ajoin_gives_an_async_idempotent_listener_an_async_session(
    engine: sa.Engine, database_url: str
) -> None:
    sessions: list[Any] = []

    class AsyncShip(Listener):
        subscribes_to = "kit_orders.placed"
        idempotent = True

        async def handle(self, message: Placed, session: AsyncSession) -> None:
            sessions.append(type(session))
            await session.execute(shipments.insert().values(order_id=message.order_id))

    async with MemoryBroker(AsyncShip, database_url=database_url) as broker:
        await broker.async_publisher.publish("kit_orders.placed", {"order_id": 4})
        await broker.ajoin()
    assert sessions == [AsyncSession]
    with engine.connect() as connection:
        assert connection.execute(sa.select(shipments.c.order_id)).scalars().all() == [4]


def test_an_outbox_row_no_listener_takes_is_moved_to_dead_and_raised(
    engine: sa.Engine, database_url: str
) -> None:
    with MemoryBroker(Shipped, database_url=database_url) as broker:
        with Session(engine) as session, session.begin():
            Ship.notify(order_id=5, session=session)  # nobody subscribes Ship here
        with pytest.raises(Unroutable):
            broker.join()
        broker.join()  # moved aside: it does not come back
    with engine.connect() as connection:
        assert connection.execute(sa.select(dead_table.c.routing_key)).scalars().all() == ["placed"]


def test_an_idempotent_listener_without_a_database_says_how_to_give_one() -> None:
    with MemoryBroker(Ship, Shipped) as broker:
        broker.publish_raw("kit_orders.placed", b'{"order_id": 6}')
        with pytest.raises(TypeError, match="database_url"):
            broker.join()


def test_join_refuses_an_async_idempotent_listener_on_sqlite_and_names_ajoin(
    engine: sa.Engine, database_url: str
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's driver waits on a socket, which join()'s clock sees")

    class AsyncShip(Listener):
        subscribes_to = "kit_orders.placed"
        idempotent = True

        async def handle(self, message: Placed, session: AsyncSession) -> None: ...

    with MemoryBroker(AsyncShip, database_url=database_url) as broker:
        broker.publish_raw("kit_orders.placed", b'{"order_id": 7}')
        with pytest.raises(TypeError, match="ajoin"):
            broker.join()
