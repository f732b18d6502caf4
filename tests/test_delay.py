"""Exact delays: `notify(delay=...)`, `notify(at=...)`, held by the broker in delay levels."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pika
import pytest
from pydantic import BaseModel
from support.waiting import eventually

import listener
from listener import Listener, delay
from listener.runner.amqp_transport import Transport
from listener.testing import MemoryBroker
from listener.topology import describe

#: On time: never early, and late by at most this many seconds.
LATE = 1.5
ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("amqp-listener"))


class Job(BaseModel):
    n: int


def make(key: str, queue: str, seen: list[tuple[int, float]] | None = None) -> type[Listener]:
    """A listener on `key` that records (n, arrival time) of every message."""

    async def handle(self: Any, message: Job) -> None:
        if seen is not None:
            seen.append((message.n, time.time()))

    namespace = {"subscribes_to": key, "queue": queue, "handle": handle, "max_attempts": 1}
    return type(f"Timed{abs(hash(queue))}", (Listener,), namespace)


def arrivals(seen: list[tuple[int, float]]) -> dict[int, float]:
    return dict(seen)


# -- refused before anything is sent ----------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "complaint"),
    [
        ({"at": dt.datetime(2030, 1, 1, 3, 0)}, "has no time zone"),
        ({"delay": -1}, "negative"),
        ({"at": dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)}, "in the past"),
        ({"delay": 5, "at": dt.datetime.now(dt.UTC)}, "not both"),
        ({"delay": 200 * 86400}, "longer than the longest"),
        ({"delay": math.nan}, "number of seconds"),
        ({"delay": "5"}, "number of seconds"),
    ],
)
def test_a_bad_delay_or_moment_is_refused_with_a_value_error_and_nothing_is_published(
    when, complaint
):
    late = make("jobs.run", "q_late")
    with MemoryBroker(late) as broker:
        with pytest.raises(ValueError, match=complaint):
            late.notify(n=1, **when)
        with pytest.raises(ValueError, match=complaint):
            listener.publish("jobs.run", {"n": 1}, **when)
        assert broker.published == []


def test_delay_zero_is_a_plain_notify_to_the_listeners_exchange():
    now = make("jobs.run", "q_now")
    with MemoryBroker(now) as broker:
        now.notify(n=1, delay=0)
        broker.join()
        assert broker.handled(now) == [Job(n=1)]
        (published,) = broker.published
        assert (published.exchange, published.routing_key) == ("jobs", "run")
        assert broker.clock.now == 0


def test_in_the_memory_broker_a_delayed_message_arrives_when_the_virtual_clock_reaches_it():
    later = make("jobs.run", "q_later")
    with MemoryBroker(later) as broker:
        later.notify(n=1, delay=90)
        later.notify(n=2, at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30))
        later.notify(n=3, delay=dt.timedelta(seconds=45))
        broker.join(wait_for_retries=False)
        assert broker.handled(later) == []
        broker.join()
        assert broker.handled(later) == [Job(n=2), Job(n=3), Job(n=1)]
        assert broker.clock.now == 90


# -- the arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "steps"),
    [(0, 0), (0.001, 1), (0.125, 1), (0.3, 3), (0.1 + 0.2, 3), (0.5, 4), (7, 56), (1.0, 8)],
)
def test_a_delay_is_rounded_up_to_whole_steps_never_down(seconds, steps):
    assert delay.steps(seconds) == steps
    assert delay.steps(seconds) * delay.STEP >= seconds


@pytest.mark.parametrize("seconds", [0.125, 0.5, 7, 45, 180, 30 * 86400, delay.MAX_DELAY])
def test_the_levels_a_message_waits_in_add_up_to_its_delay(seconds):
    *levels, unrouted = describe(
        exchange="jobs", binding_key="run", queue="q", retry_delays=(), queue_type="quorum"
    ).levels
    assert len(levels) == delay.LEVELS
    assert unrouted.name == delay.UNROUTED
    key = delay.bits_key(delay.steps(seconds)).split(".")[1:]
    waited = sum(
        spec.arguments["x-message-ttl"]
        for level, spec in enumerate(levels)
        if key[delay.LEVELS - 1 - level] == "1"
    )
    assert waited == delay.steps(seconds) * 125
    assert max(spec.arguments["x-message-ttl"] for spec in levels) < 2**32


# -- on the broker ----------------------------------------------------------------------------


async def test_delayed_messages_reach_the_listener_never_early_and_at_most_a_second_and_a_half_late(
    unique, rabbit, run_worker
):
    seen: list[tuple[int, float]] = []
    timed = make(f"{unique}.run", f"{unique}.timed", seen)
    async with run_worker(timed):
        started = time.time()
        sends = {
            1: 0.5,
            2: 1.2,
            3: 0.5,
            4: 0.5,
            5: 0,
        }
        await asyncio.to_thread(timed.notify, n=1, delay=0.5)
        await timed.anotify(n=2, at=dt.datetime.fromtimestamp(started + 1.2, dt.UTC))
        await timed.anotify_many([Job(n=3), Job(n=4)], delay=0.5)
        await timed.anotify(n=5, delay=0)
        await eventually(lambda: len(seen) == len(sends), timeout=10)

    got = arrivals(seen)
    for n, wanted in sends.items():
        assert got[n] - started >= wanted, f"message {n} came early"
        assert got[n] - started <= wanted + LATE, f"message {n} came late"
    assert got[5] < got[1]  # delay=0 did not wait behind the delayed ones
    assert rabbit.count(f"{timed.queue}.dead") == 0


async def test_a_delayed_notify_reaches_only_its_own_listener_and_a_delayed_publish_reaches_all(
    unique, rabbit, run_worker
):
    mine: list[tuple[int, float]] = []
    theirs: list[tuple[int, float]] = []
    first = make(f"{unique}.run", f"{unique}.first", mine)
    second = make(f"{unique}.run", f"{unique}.second", theirs)
    async with run_worker(first, second):
        await first.anotify(n=1, delay=0.25)
        await listener.apublish(f"{unique}.run", {"n": 2}, delay=0.25)
        await eventually(lambda: len(mine) == 2 and len(theirs) == 1, timeout=10)
        # Past the time another copy would have taken to arrive.
        await asyncio.sleep(1)

    assert sorted(n for n, _ in mine) == [1, 2]
    assert [n for n, _ in theirs] == [2]


async def test_a_thirty_day_delay_takes_the_route_its_bits_say_checked_hop_by_hop(
    unique, rabbit, run_worker
):
    seen: list[tuple[int, float]] = []
    month = make(f"{unique}.run", f"{unique}.month", seen)
    thirty_days = 30 * 86400
    route = delay.bits_key(delay.steps(thirty_days))
    words = route.split(".")[1:]
    levels = [n for n in range(delay.LEVELS) if words[delay.LEVELS - 1 - n] == "1"]
    assert levels == [11, 13, 14, 18, 19, 20, 21, 24]
    mine = delay.target_key(month.queue)

    def ours(properties: Any) -> bool:
        headers = properties.headers or {}
        return mine in headers.get("CC", []) or headers.get("x-original-exchange") == unique

    def take(level: int) -> list[Any]:
        # The levels are shared by every listener: keep this test's messages only.
        return [p for p, _ in rabbit.drain(delay.level_name(level)) if ours(p)]

    async def arrives(level: int) -> Any:
        found: list[Any] = []
        await eventually(lambda: bool(found.extend(take(level)) or found))
        (properties,) = found
        return properties

    async with run_worker(month):
        await month.anotify(n=1, delay=thirty_days)
        properties = await arrives(24)
        # Entered by the listener's key, with the bits in CC.
        assert properties.headers["CC"] == [route]
        due = dt.datetime.fromisoformat(properties.headers["x-due-at"])
        assert due - dt.datetime.now(dt.UTC) > dt.timedelta(days=29, hours=23)

        # When level n's time is up the broker dead-letters the message to exchange n-1 with
        # its routing keys: a copy published there must land in the next level it waits in.
        channel = rabbit._ch()
        for upper, lower in zip(levels[::-1], levels[::-1][1:], strict=False):
            channel.basic_publish(
                delay.level_name(upper - 1),
                route,
                b'{"n": 2}',
                pika.BasicProperties(delivery_mode=2, headers={"CC": [mine]}),
            )
            await arrives(lower)
        # From the lowest level it waits in (11), the rest of the way leads to the listener.
        channel.basic_publish(
            delay.level_name(10),
            route,
            b'{"n": 3}',
            pika.BasicProperties(delivery_mode=2, headers={"CC": [mine]}),
        )
        await eventually(lambda: [n for n, _ in seen] == [3])


@pytest.mark.slow
async def test_delays_of_seven_and_forty_five_seconds_land_on_time(unique, rabbit, run_worker):
    seen: list[tuple[int, float]] = []
    timed = make(f"{unique}.run", f"{unique}.slow", seen)
    async with run_worker(timed):
        started = time.time()
        await timed.anotify(n=7, delay=7)
        await timed.anotify(n=45, at=dt.datetime.fromtimestamp(started + 45, dt.UTC))
        await eventually(lambda: len(seen) == 2, timeout=45 + 10)

    got = arrivals(seen)
    for n in (7, 45):
        assert n <= got[n] - started <= n + LATE


async def test_status_counts_the_delayed_messages_and_those_whose_listener_is_gone(
    unique, rabbit, run_worker, settings, tmp_path
):
    module = tmp_path / f"{unique}_app.py"
    module.write_text(
        "from listener import Listener\n"
        "class Hourly(Listener):\n"
        f"    subscribes_to = '{unique}.run'\n"
        f"    queue = '{unique}.hourly'\n"
        "    def handle(self, message): ...\n"
    )
    env_path = f"{tmp_path}{os.pathsep}{ROOT}"

    async def status() -> dict[str, Any]:
        result = await asyncio.to_thread(
            subprocess.run,
            [CLI, "status", f"{unique}_app", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": env_path},
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def clear_the_shared_levels() -> None:
        # Earlier tests' leftovers, and this test's own at the end: no other test runs now.
        for name in (*(delay.level_name(level) for level in range(delay.LEVELS)), delay.UNROUTED):
            rabbit.drain(name)

    hourly = make(f"{unique}.run", f"{unique}.hourly")
    gone = make(f"{unique}.gone", f"{unique}.gone")
    transport = await Transport.connect(settings, name="test")
    try:
        await transport.declare(gone.topology(settings))  # declared, and no worker runs it
    finally:
        await transport.close()
    async with run_worker(hourly):
        clear_the_shared_levels()
        await hourly.anotify(n=1, delay=3600)
        await hourly.anotify(n=2, delay=90)
        await gone.anotify(n=3, delay=0.5)
        await gone.anotify(n=4, delay=0.5)
        rabbit.delete_queue(gone.queue)  # before they are due: they find no listener
        await eventually(lambda: rabbit.count(delay.UNROUTED) == 2)
        after = await status()

    clear_the_shared_levels()
    assert after["delay_levels"] == {"declared": True, "delayed": 2, "unrouted": 2}
    (row,) = after["listeners"]
    assert (row["queue"], row["ready"]) == (hourly.queue, 0)


# -- through the outbox -------------------------------------------------------------------------


async def test_a_delay_through_the_outbox_counts_from_the_commit_not_from_the_relay(
    unique, rabbit, run_worker, database_url, settings
):
    from sqlalchemy.orm import Session

    from listener import database
    from listener.relay import Relay

    seen: list[tuple[int, float]] = []
    timed = make(f"{unique}.run", f"{unique}.outboxed", seen)
    engine = database.create_engine(database_url)
    try:
        async with run_worker(timed):
            with Session(engine) as session, session.begin():
                timed.notify(n=1, delay=3, session=session)
                listener.publish(f"{unique}.run", {"n": 2}, delay=3, session=session)
            committed = time.time()
            await asyncio.sleep(1.5)  # the relay comes late: the wait is not added to the delay
            relay = Relay(settings.with_database_url(database_url))
            try:
                assert await relay.run_once() == 2
            finally:
                await relay._publisher.aclose()
                if relay._engine is not None:
                    await relay._engine.dispose()
            await eventually(lambda: len(seen) == 2, timeout=10)
    finally:
        engine.dispose()

    for n, arrived in arrivals(seen).items():
        assert committed + 3 - 0.2 <= arrived <= committed + 3 + LATE, (n, arrived - committed)


def test_a_delayed_publish_no_listener_is_bound_for_is_refused_as_unroutable(unique, rabbit):
    with pytest.raises(listener.Unroutable):
        listener.publish(f"{unique}.nobody", {"n": 1}, delay=5)


def test_a_delayed_notify_before_the_topology_was_declared_is_refused_as_unroutable(unique, rabbit):
    undeclared = make(f"{unique}.run", f"{unique}.undeclared")
    with pytest.raises(listener.Unroutable, match="declare"):
        undeclared.notify(n=1, delay=5)
