"""A web service that creates an order and notifies in one database transaction.

    AMQP_LISTENER_DATABASE_URL=sqlite:///orders.db amqp-listener db upgrade
    uvicorn examples.orders.app:app
    curl -i -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"customer": "ada", "item": "tea", "quantity": 2}'

`POST /orders` inserts the order and `ShipOrder.notify(..., session=session)` writes the
message into the outbox in the same transaction: both commit, or neither does. The app never
talks to RabbitMQ, so it keeps taking orders while the broker is down; the relay
(`amqp-listener run ... --outbox`, or `amqp-listener relay`) publishes once it is back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker

from examples.orders.listeners import ShipOrder
from examples.orders.models import Base, Order, database_url
from listener import database


class NewOrder(BaseModel):
    customer: str = Field(min_length=1, max_length=200)
    item: str = Field(min_length=1, max_length=200)
    quantity: int = Field(gt=0)


def session(request: Request) -> Iterator[Session]:
    """A session on the app's database, for one request."""
    with request.app.state.sessions() as db:
        yield db


DbSession = Annotated[Session, Depends(session)]
router = APIRouter()


@router.post("/orders", status_code=201)
def place(order: NewOrder, db: DbSession) -> dict[str, Any]:
    """Insert the order and its message in one transaction: both commit, or neither."""
    with db.begin():
        row = Order(customer=order.customer, item=order.item, quantity=order.quantity)
        db.add(row)
        db.flush()  # the order's id, for the message
        message_id = ShipOrder.notify(order_id=row.id, session=db)
    return {"order_id": row.id, "message_id": message_id}


@router.get("/orders/{order_id}")
def show(order_id: int, db: DbSession) -> dict[str, Any]:
    row = db.get(Order, order_id)
    if row is None:
        raise HTTPException(404, f"no order {order_id}")
    return {
        "order_id": row.id,
        "status": row.status,
        "customer_told": row.customer_told_at is not None,
    }


def create_app(url: str | None = None) -> FastAPI:
    """The app on the database at `url` (default: `models.database_url()`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = database.create_engine(url or database_url())
        Base.metadata.create_all(engine)  # the service's tables; `db upgrade` makes ours
        app.state.sessions = sessionmaker(engine)
        yield
        engine.dispose()

    app = FastAPI(title="Orders", lifespan=lifespan)
    app.include_router(router)
    return app


app = create_app()
