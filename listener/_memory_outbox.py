"""What a `MemoryBroker` given a database does with the outbox: relay it inline.

`flush()` is the relay's work without a broker: every committed outbox row, oldest first, is
published into the memory broker's store and deleted. A row no queue is bound for goes to
`amqp_listener_outbox_dead` with the reason, as the relay would move it, and the first
such row is raised as `Unroutable` once the others are through.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import sqlalchemy as sa

from listener import outbox
from listener.errors import Unroutable

if TYPE_CHECKING:
    from listener._memory_broker import Store

__all__ = ["flush"]


def flush(engine: sa.Engine, store: Store) -> int:
    """Publish every committed outbox row into `store`; how many were published.

    Raises:
        Unroutable: a row no queue is bound for (moved to the dead table first).
    """
    table = outbox.outbox_table
    published = 0
    first_error: Unroutable | None = None
    with engine.begin() as connection:
        rows = connection.execute(sa.select(table).order_by(table.c.id)).all()
        for row in rows:
            try:
                store.publish(
                    row.exchange,
                    row.routing_key,
                    row.body,
                    headers=row.headers,
                    message_id=row.message_id,
                )
                published += 1
            except Unroutable as exc:
                first_error = first_error or exc
                connection.execute(
                    sa.insert(outbox.dead_table).values(
                        outbox.dead_row(row, str(exc), dt.datetime.now(dt.UTC))
                    )
                )
        ids = [row.id for row in rows]
        for start in range(0, len(ids), 500):
            connection.execute(sa.delete(table).where(table.c.id.in_(ids[start : start + 500])))
    if first_error is not None:
        raise first_error
    return published
