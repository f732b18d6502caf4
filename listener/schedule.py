"""Schedules: when a listener's ticks fall, and the message each tick sends (pure).

A listener sets `schedule = "0 3 * * *"` (cron: minute, hour, day of month, month, day of
week) or `every = timedelta(minutes=5)`. Cron expressions are read in the time zone of the
`schedule_timezone` setting (UTC by default), on the wall clock:

* a local time that a change to summer time skips (02:30 on that night in Europe) fires when
  the clock jumps, at the first minute after the gap;
* a local time that the change back repeats fires once, the first time.

`every` ticks fall on whole multiples of the interval since 1970-01-01 UTC, so every runner
agrees on them without talking to the others.

Each tick's message has the id `tick_message_id(listener, tick)`, the same whichever process
fires it, and carries the tick in the `x-schedule-tick` header (ISO 8601, UTC).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from listener.listener import Listener

__all__ = [
    "TICK_HEADER",
    "MissedTicks",
    "Schedule",
    "default_message",
    "schedule_of",
    "tick_message_id",
    "time_zone",
]

TICK_HEADER = "x-schedule-tick"
MissedTicks = Literal["last", "skip"]
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: A cron expression that matches nothing for this long (`0 0 30 2 *`) is refused.
_HORIZON = dt.timedelta(days=366 * 5)


@dataclass(frozen=True, slots=True)
class Schedule:
    """One listener's ticks: a cron expression in `zone`, or a fixed interval."""

    cron: str | None = None
    every: dt.timedelta | None = None
    zone: dt.tzinfo = dt.UTC

    @property
    def expression(self) -> str:
        """How `amqp-listener schedules` shows it: the cron text, or `every 300s`."""
        if self.cron is not None:
            return self.cron
        assert self.every is not None
        return f"every {self.every.total_seconds():g}s"

    def next_after(self, moment: dt.datetime) -> dt.datetime:
        """The first tick strictly after `moment` (aware), in UTC."""
        moment = moment.astimezone(dt.UTC)
        if self.every is not None:
            step = self.every
            return _EPOCH + ((moment - _EPOCH) // step + 1) * step
        assert self.cron is not None
        from croniter import croniter

        wall = moment.astimezone(self.zone).replace(tzinfo=None, fold=0)
        ticks = croniter(self.cron, wall)
        while True:
            local: dt.datetime = ticks.get_next(dt.datetime)
            tick = _utc(local, self.zone)
            if tick > moment:
                return tick
            if tick - moment > _HORIZON:  # pragma: no cover - refused at declaration
                raise ValueError(f"cron {self.cron!r} has no tick within five years")

    def last_at_or_before(self, moment: dt.datetime) -> dt.datetime:
        """The latest tick at or before `moment`, in UTC."""
        moment = moment.astimezone(dt.UTC)
        if self.every is not None:
            return _EPOCH + ((moment - _EPOCH) // self.every) * self.every
        assert self.cron is not None
        from croniter import croniter

        # One minute past, so that a tick exactly at `moment` counts.
        wall = (moment + dt.timedelta(minutes=1)).astimezone(self.zone).replace(tzinfo=None)
        ticks = croniter(self.cron, wall)
        while True:
            tick = _utc(ticks.get_prev(dt.datetime), self.zone)
            if tick <= moment:
                return tick

    def missed(
        self, last: dt.datetime | None, now: dt.datetime, policy: MissedTicks | str
    ) -> dt.datetime | None:
        """The one tick to fire late on taking over: the latest after `last` and not after
        `now`, under the policy "last"; none under "skip" or when none was fired before."""
        if last is None or policy == "skip":
            return None
        latest = self.last_at_or_before(now)
        return latest if latest > last else None


def _utc(local: dt.datetime, zone: dt.tzinfo) -> dt.datetime:
    """The instant of wall-clock time `local` in `zone`: the first one when it repeats,
    the end of the gap when it is skipped."""
    aware = local.replace(tzinfo=zone, fold=0)
    if aware.astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None) == local:
        return aware.astimezone(dt.UTC)
    # Skipped by a change to summer time: the clock jumped over it; fire when it landed.
    probe = local
    while (
        probe.replace(tzinfo=zone).astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None) != probe
    ):
        probe += dt.timedelta(minutes=1)
    return probe.replace(tzinfo=zone).astimezone(dt.UTC)


def time_zone(name: str) -> dt.tzinfo:
    """The zone of the `schedule_timezone` setting (an IANA name)."""
    if name.upper() == "UTC":
        return dt.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as 'Europe/Paris' (the "
            "tzdata package provides them where the system has none)"
        ) from None


def schedule_of(cls: type[Listener], zone: dt.tzinfo = dt.UTC) -> Schedule | None:
    """The schedule a listener class declares, or None."""
    cron = getattr(cls, "schedule", None)
    every = getattr(cls, "every", None)
    if cron is None and every is None:
        return None
    return Schedule(cron=cron, every=every, zone=zone)


def tick_message_id(cls: type[Listener], tick: dt.datetime) -> str:
    """The message id of `cls`'s tick at `tick`: the same in every process."""
    text = f"{cls.name()}|{tick.astimezone(dt.UTC).isoformat()}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def default_message(cls: type[Listener], tick: dt.datetime) -> Any:
    """`schedule_message()`'s default: an empty model, or the model's only field (a
    datetime) set to the tick; `{"tick": ISO 8601}` for a listener without a model."""
    model = cls.message_type
    fields = getattr(model, "model_fields", None)
    if fields is None:
        return {"tick": tick.isoformat()}
    if not fields:
        return model()
    (name,) = fields
    return model(**{name: tick})


def check_message_model(cls: type[Listener]) -> str | None:
    """What is wrong with `cls`'s model for the default tick message, or None."""
    fields = getattr(cls.message_type, "model_fields", None)
    if fields is None or not fields:
        return None
    if len(fields) == 1:
        (info,) = fields.values()
        if info.annotation in (dt.datetime, dt.datetime | None):
            return None
    return (
        "the message model is neither empty nor a single datetime field: define "
        "schedule_message(cls, tick) to build each tick's message"
    )
