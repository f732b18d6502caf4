"""Schedules in the MemoryBroker: `advance()` fires the ticks it moves over, in order, each
at its own moment on the virtual clock, as the elected scheduler would publish them."""

from __future__ import annotations

import datetime as dt

from listener import codec
from listener import schedule as _schedule
from listener._memory_broker import Store

__all__ = ["advance_with_ticks"]


def advance_with_ticks(store: Store, zone: dt.tzinfo, seconds: float) -> None:
    """Move `store`'s clock by `seconds`, publishing every tick due on the way."""
    end = store.clock.now + seconds
    plans = [(cls, plan) for cls in store.listeners if (plan := _schedule.schedule_of(cls, zone))]
    fired: dict[type, dt.datetime] = {}
    while plans:
        now = store.clock.datetime
        upcoming = [(plan.next_after(max(now, fired.get(cls, now))), cls) for cls, plan in plans]
        tick = min(moment for moment, _ in upcoming)
        offset = (tick - store.clock.datetime).total_seconds() + store.clock.now
        if offset > end:
            break
        store.advance(max(0.0, offset - store.clock.now))
        for moment, cls in upcoming:
            if moment == tick:
                fired[cls] = tick
                body = cls.codec.encode(cls.schedule_message(tick))
                store.publish(
                    "",
                    cls.queue,
                    body,
                    headers={_schedule.TICK_HEADER: tick.isoformat()},
                    message_id=_schedule.tick_message_id(cls, tick),
                    content_type=codec.CONTENT_TYPE,
                )
    store.advance(max(0.0, end - store.clock.now))
