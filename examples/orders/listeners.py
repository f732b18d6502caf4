"""The orders service's listeners: run them with the relay beside them,

    amqp-listener db upgrade
    amqp-listener run examples.orders.listeners --outbox

`ShipOrder` gets each placed order once the order's transaction committed, so the order is
always there to read. It ships it and tells the customer through the outbox, in its own
transaction: with `idempotent = True`, a redelivered message finds its id in the inbox and
ships nothing twice.
"""

from __future__ import annotations

import datetime as dt
import logging

from pydantic import BaseModel
from sqlalchemy.orm import Session

from examples.orders.models import Order, Shipment
from listener import Listener, Reject

log = logging.getLogger("examples.orders")


class OrderPlaced(BaseModel):
    order_id: int


class OrderShipped(BaseModel):
    order_id: int


class ShipOrder(Listener):
    subscribes_to = "orders.placed"
    idempotent = True

    def handle(self, message: OrderPlaced, session: Session) -> None:
        order = session.get(Order, message.order_id)
        if order is None:  # cannot happen: the message was published after the commit
            raise Reject(f"order {message.order_id} does not exist")
        order.status = "shipped"
        session.add(Shipment(order_id=order.id))
        TellCustomer.notify(order_id=order.id, session=session)
        log.info("order %d shipped", order.id)


class TellCustomer(Listener):
    subscribes_to = "orders.shipped"
    idempotent = True

    def handle(self, message: OrderShipped, session: Session) -> None:
        order = session.get(Order, message.order_id)
        if order is None:
            raise Reject(f"order {message.order_id} does not exist")
        order.customer_told_at = dt.datetime.now(dt.UTC)
        log.info("customer %s told that order %d shipped", order.customer, order.id)
