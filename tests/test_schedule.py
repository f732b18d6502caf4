"""Schedules: when ticks fall (cron in a time zone, intervals), their messages, and the
declaration checks; on the MemoryBroker's virtual clock, across changes of summer time."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel

from listener import Listener, ListenerDefinitionError
from listener.schedule import TICK_HEADER, Schedule, tick_message_id, time_zone
from listener.testing import MemoryBroker

UTC = dt.UTC
CLI = str(Path(sys.executable).with_name("amqp-listener"))
PARIS = ZoneInfo("Europe/Paris")


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def ticks(plan: Schedule, start: dt.datetime, count: int) -> list[dt.datetime]:
    found = []
    moment = start
    for _ in range(count):
        moment = plan.next_after(moment)
        found.append(moment)
    return found


class Empty(BaseModel):
    pass


class Stamp(BaseModel):
    at: dt.datetime


# -- when ticks fall ---------------------------------------------------------------------------


def test_every_ticks_on_whole_multiples_of_the_interval_so_all_runners_agree():
    plan = Schedule(every=dt.timedelta(minutes=5))
    assert ticks(plan, utc(2026, 1, 1, 10, 2, 30), 3) == [
        utc(2026, 1, 1, 10, 5),
        utc(2026, 1, 1, 10, 10),
        utc(2026, 1, 1, 10, 15),
    ]
    assert plan.next_after(utc(2026, 1, 1, 10, 5)) == utc(2026, 1, 1, 10, 10)  # strictly after
    assert plan.last_at_or_before(utc(2026, 1, 1, 10, 5)) == utc(2026, 1, 1, 10, 5)


def test_cron_in_utc_by_default():
    plan = Schedule(cron="0 3 * * *")
    assert ticks(plan, utc(2026, 5, 1, 12), 2) == [utc(2026, 5, 2, 3), utc(2026, 5, 3, 3)]


def test_a_local_time_skipped_by_summer_time_fires_when_the_clock_jumps():
    # Paris, 29 March 2026: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that night.
    plan = Schedule(cron="30 2 * * *", zone=PARIS)
    assert ticks(plan, utc(2026, 3, 27, 12), 3) == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST, the first minute after the gap
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]


def test_a_local_time_repeated_by_the_change_back_fires_once():
    # Paris, 25 October 2026: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
    plan = Schedule(cron="30 2 * * *", zone=PARIS)
    assert ticks(plan, utc(2026, 10, 24, 12), 2) == [
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST, the first time
        utc(2026, 10, 26, 1, 30),  # 02:30 CET
    ]


@pytest.mark.parametrize(
    ("last", "policy", "fired"),
    [
        (utc(2026, 1, 1, 3), "last", utc(2026, 1, 4, 3)),  # three missed: the latest, once
        (utc(2026, 1, 1, 3), "skip", None),
        (utc(2026, 1, 4, 3), "last", None),  # nothing missed
        (None, "last", None),  # never fired before: nothing to catch up on
    ],
)
def test_missed_ticks_fire_the_latest_once_or_none(last, policy, fired):
    plan = Schedule(cron="0 3 * * *")
    assert plan.missed(last, utc(2026, 1, 4, 12), policy) == fired


def test_a_tick_has_the_same_message_id_in_every_process_and_its_own_per_tick():
    class Nightly(Listener):
        subscribes_to = "jobs.nightly"
        schedule = "0 3 * * *"

        def handle(self, message: Empty) -> None: ...

    first = tick_message_id(Nightly, utc(2026, 1, 1, 3))
    assert first == tick_message_id(Nightly, dt.datetime(2026, 1, 1, 4, tzinfo=PARIS))
    assert first != tick_message_id(Nightly, utc(2026, 1, 2, 3))
    assert len(first) == 32


def test_an_unknown_time_zone_is_refused_naming_it():
    with pytest.raises(ValueError, match="Mars/Olympus"):
        time_zone("Mars/Olympus")


# -- declaration checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "complaint"),
    [
        ({"schedule": "0 3 * *"}, "five fields"),
        ({"schedule": "61 3 * * *"}, "five fields"),
        ({"schedule": "0 3 * * *", "every": dt.timedelta(hours=1)}, "both set"),
        ({"every": dt.timedelta(milliseconds=10)}, "at least 1 second"),
        ({"every": 60}, "timedelta"),
        ({"every": dt.timedelta(hours=1), "missed_ticks": "all"}, "'last' or 'skip'"),
    ],
)
def test_a_wrong_schedule_fails_at_import_naming_the_class_and_attribute(attributes, complaint):
    namespace = {"subscribes_to": "jobs.run", "handle": lambda self, message: None, **attributes}
    with pytest.raises(ListenerDefinitionError, match=complaint) as caught:
        type("Wrong", (Listener,), namespace)
    assert "Wrong" in str(caught.value)


class Report(BaseModel):
    day: dt.date
    recipients: list[str]


def test_a_model_the_default_tick_message_cannot_fill_needs_schedule_message():
    with pytest.raises(ListenerDefinitionError, match="schedule_message"):

        class Reporter(Listener):
            subscribes_to = "jobs.report"
            every = dt.timedelta(days=1)

            def handle(self, message: Report) -> None: ...

    class ReporterWithMessage(Listener):
        subscribes_to = "jobs.report"
        every = dt.timedelta(days=1)

        @classmethod
        def schedule_message(cls, tick: dt.datetime) -> Report:
            return Report(day=tick.date(), recipients=["ops"])

        def handle(self, message: Report) -> None: ...

    assert ReporterWithMessage.schedule_message(utc(2026, 1, 1)).recipients == ["ops"]


# -- on the MemoryBroker's virtual clock -------------------------------------------------------


def test_a_cron_schedule_in_paris_fires_on_the_virtual_clock_across_the_summer_time_change():
    seen: list[dt.datetime] = []

    class Nightly(Listener):
        subscribes_to = "jobs.nightly"
        schedule = "30 2 * * *"

        def handle(self, message: Stamp) -> None:
            seen.append(message.at)

    start = utc(2026, 3, 27, 12)
    with MemoryBroker(Nightly, start=start, schedule_timezone="Europe/Paris") as broker:
        broker.advance(3 * 86400)
        broker.join()

    assert seen == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]
    published = broker.published
    assert [m.headers[TICK_HEADER] for m in published] == [t.isoformat() for t in seen]
    assert [m.message_id for m in published] == [tick_message_id(Nightly, t) for t in seen]


def test_an_every_schedule_with_an_empty_model_fires_once_per_tick_on_the_virtual_clock():
    count = 0

    class Heartbeat(Listener):
        subscribes_to = "jobs.beat"
        every = dt.timedelta(seconds=30)

        def handle(self, message: Empty) -> None:
            nonlocal count
            count += 1

    with MemoryBroker(Heartbeat, start=utc(2026, 1, 1, 0, 0, 10)) as broker:
        broker.advance(100)  # ticks at :30, 1:00, 1:30
        broker.join()

    assert count == 3


def test_the_schedules_command_names_a_module_that_does_not_exist_and_exits_2():
    result = subprocess.run(
        [CLI, "schedules", "no_such_module_for_schedules"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "no_such_module_for_schedules" in result.stderr
