"""The orders service's own tables, in the same database as the framework's outbox and inbox:
that is what lets an order and its message commit together."""

from __future__ import annotations

import datetime as dt
import os

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: The one database of the service and of the framework. SQLite by default; a PostgreSQL
#: URL (postgresql://user@host/db) works the same.
DEFAULT_DATABASE_URL = "sqlite:///orders.db"


def database_url() -> str:
    """`AMQP_LISTENER_DATABASE_URL`, which the relay and the inbox read too."""
    return os.environ.get("AMQP_LISTENER_DATABASE_URL") or DEFAULT_DATABASE_URL


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String(200))
    item: Mapped[str] = mapped_column(String(200))
    quantity: Mapped[int]
    status: Mapped[str] = mapped_column(String(20), default="placed")
    placed_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=lambda: dt.datetime.now(dt.UTC)
    )
    customer_told_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Shipment(Base):
    """One per shipped order: the listener's side effect, written once however often it
    gets the message."""

    __tablename__ = "shipments"

    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), primary_key=True)
    shipped_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=lambda: dt.datetime.now(dt.UTC)
    )
