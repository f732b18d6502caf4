"""Broker, worker and lifecycle faults, Jepsen-style, on the project-owned node.

Every test publishes confirmed messages with unique ids, injects a fault, lets the system
recover, drains, and classifies (tests/faults/harness.py): **lost** (confirmed but neither
handled nor parked) must be 0; **duplicates** are counted, reported and bounded; the time to
recover is measured. The fault ids (A4, B1, B2, B4, B7, E1) are those of the report table.

Workers are real `amqp-listener run faults.app --workers N` processes. The broker is
the session's own node (conftest.py), never the shared one on 5672.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

import listener.apublisher
import listener.publisher
from faults.harness import Runner, describe, wait_until
from faults.node import RabbitNode
from faults.payload import Item, item
from listener import Listener
from listener.errors import PublishTimeout
from listener.settings import get_settings

pytestmark = pytest.mark.slow

CONCURRENCY = 8


def reconnects(runner: Runner) -> int:
    return runner.stderr.count("reconnected to ")


# -- B1: the broker application stops and starts under load -----------------------------------


def test_a_broker_app_restart_under_load_brings_both_consumers_back_and_loses_nothing(fault, node):
    runner = fault.start_runner(workers=2, FAULT_CONCURRENCY=str(CONCURRENCY))
    wait_until(lambda: fault.consumers() == 2, 15, "two consumers")

    # Paced so that publishing goes on through the outage: calls then raise, never hang.
    with fault.publishing(1000, sleep=0.005, interval=0.004, fail_every=10, timeout=90):
        fault.wait_confirmed(300)
        node.stop_app()
        time.sleep(3)
        node.start_app()
        restarted = time.monotonic()
        wait_until(lambda: reconnects(runner) >= 2, 40, "both workers to reconnect")
        wait_until(lambda: fault.consumers() == 2, 20, "two consumers again")
        back = time.monotonic() - restarted
    settled = fault.wait_settled(60)

    verdict = fault.verdict(
        "B1 stop_app 3s/start_app, --workers 2, 1000 msgs",
        recovery_s=back,
        notes=f"all handled {settled - restarted:.1f}s after start_app",
    )
    verdict.assert_nothing_lost()
    assert verdict.confirmed == 1000
    assert verdict.retried >= 50, "retries were meant to be moving during the outage"
    assert verdict.parked == 0
    # Only deliveries handled but not yet acked when the connections went can come twice.
    assert verdict.duplicates <= 2 * CONCURRENCY
    assert not runner.exited
    assert runner.deaths() == [], "a worker died instead of reconnecting"


# -- B2: the broker process is killed -9 and started again -------------------------------------


def test_a_broker_killed_minus_9_and_restarted_keeps_every_confirmed_message(fault, node):
    fault.declare()
    fault.publish(600, sleep=0.05)  # a backlog that must survive the crash on disk
    beam = node.os_pid()
    runner = fault.start_runner(workers=2, FAULT_CONCURRENCY=str(CONCURRENCY))

    # Paced so that publishing goes on through the crash and the restart.
    with fault.publishing(400, sleep=0.02, interval=0.005, timeout=90):
        wait_until(lambda: fault.handled_count() >= 50, 20, "50 messages handled")
        unhandled_at_kill = fault.confirmed_ids() - set(fault.handled())
        node.kill(beam)
        killed = time.monotonic()
        time.sleep(1)
        node.start()
        restarted = time.monotonic()
        wait_until(lambda: fault.consumers() == 2, 40, "two consumers after the restart")
        back = time.monotonic() - restarted
    settled = fault.wait_settled(60)

    verdict = fault.verdict(
        "B2 kill -9 beam, restart, --workers 2",
        recovery_s=back,
        notes=(
            f"{len(unhandled_at_kill)} confirmed-unhandled at the kill; outage "
            f"{restarted - killed:.1f}s; all handled {settled - restarted:.1f}s after restart"
        ),
    )
    verdict.assert_nothing_lost()
    assert len(unhandled_at_kill) >= 200, "the crash hit too small a backlog to prove anything"
    assert unhandled_at_kill <= set(fault.handled()) | set(fault.parked)
    assert verdict.parked == 0
    assert verdict.duplicates <= 2 * CONCURRENCY
    assert not runner.exited
    assert runner.deaths() == [], "a worker died instead of reconnecting"


# -- B4: the broker closes every connection (CONNECTION_FORCED) mid-stream ----------------------


def test_forced_closes_of_every_connection_mid_stream_lose_nothing(fault, node):
    runner = fault.start_runner(workers=2, FAULT_CONCURRENCY=str(CONCURRENCY))
    recoveries = []

    with fault.publishing(800, sleep=0.005, interval=0.003, fail_every=10, timeout=60):
        for round_ in range(1, 3):
            fault.wait_confirmed(250 * round_)
            closed = time.monotonic()
            node.ctl("close_all_connections", "fault suite B4")
            wait_until(lambda r=round_: reconnects(runner) >= 2 * r, 20, "both workers back")
            wait_until(lambda: fault.consumers() == 2, 15, "two consumers again")
            recoveries.append(time.monotonic() - closed)
    fault.wait_settled(60)

    verdict = fault.verdict(
        "B4 close_all_connections x2, --workers 2",
        recovery_s=max(recoveries),
        notes="recoveries " + ", ".join(f"{r:.1f}s" for r in recoveries),
    )
    verdict.assert_nothing_lost()
    assert verdict.confirmed == 800
    assert verdict.retried >= 50, "retries were meant to be moving during the closes"
    assert verdict.parked == 0
    assert verdict.duplicates <= 2 * 2 * CONCURRENCY
    assert runner.deaths() == [], "a worker died instead of reconnecting"


# -- B7: a memory alarm blocks publishers ---------------------------------------------------------


@pytest.fixture
def notify_on_node(node, monkeypatch):
    """notify() of this process publishes to the test node, with a 2 s confirm timeout."""
    monkeypatch.setenv("AMQP_URL", node.url)
    monkeypatch.setenv("AMQP_LISTENER_CONFIRM_TIMEOUT", "2")
    get_settings.cache_clear()
    monkeypatch.setattr(listener.publisher, "_default", None)
    # notify_many() publishes from a background loop whose publisher outlives the test: this
    # test gets a loop of its own, so later tests never publish to this node.
    monkeypatch.setattr(listener.apublisher, "_background", None)
    try:
        yield
    finally:
        listener.publisher.default_publisher().close()
        background = listener.apublisher._background
        if background is not None and background.publisher is not None:
            closing = asyncio.run_coroutine_threadsafe(
                background.publisher.aclose(), background.loop
            )
            closing.result(timeout=10)
            background.loop.call_soon_threadsafe(background.loop.stop)
        get_settings.cache_clear()


class MemoryAlarm:
    """The node's memory alarm, raised by a watermark so low that any use is over it."""

    def __init__(self, node: RabbitNode) -> None:
        self.node = node

    def active(self) -> bool:
        return "memory" in self.node.ctl("eval", "rabbit_alarm:get_alarms().")

    def raise_(self) -> None:
        self.node.ctl("set_vm_memory_high_watermark", "0.00001")
        wait_until(self.active, 15, "the memory alarm", step=0.2)

    def clear(self) -> None:
        self.node.ctl("set_vm_memory_high_watermark", "0.4")
        wait_until(lambda: not self.active(), 15, "the alarm to clear", step=0.2)


@pytest.fixture
def memory_alarm(node: RabbitNode) -> Iterator[MemoryAlarm]:
    """Control of the node's memory alarm; the watermark is back at 0.4 after the test."""
    try:
        yield MemoryAlarm(node)
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")


def test_a_memory_alarm_makes_notify_time_out_while_consumers_drain_and_then_recovers(
    fault, node, notify_on_node, memory_alarm
):
    class Sender(Listener):
        subscribes_to = fault.address
        queue = fault.queue

        def handle(self, message: Item) -> None:
            raise AssertionError("this class only publishes; faults.app consumes")

    def notify(message_id: str, **fields) -> bool:
        return fault.attempt(message_id, lambda: Sender.notify(**item(message_id, **fields)))

    runner = fault.start_runner(workers=1, FAULT_CONCURRENCY="4")
    # A backlog the consumer drains during the alarm, published in one confirmed batch so
    # that it is still there when the alarm goes up, however loaded the machine is.
    backlog = [f"backlog-{n}" for n in range(300)]
    Sender.notify_many([item(message_id, sleep=0.05) for message_id in backlog])
    for message_id in backlog:  # notify_many() returned: every one of them was confirmed
        assert fault.attempt(message_id, lambda: None)

    memory_alarm.raise_()
    alarm_on = time.monotonic()
    handled_at_alarm = fault.handled_count()
    started = time.monotonic()
    blocked = notify("blocked-1")
    waited = time.monotonic() - started

    assert not blocked, "notify() returned although the broker blocks publishers"
    assert fault.unknown["blocked-1"] == PublishTimeout.__name__
    assert waited < 2 + 1.5, f"notify() took {waited:.1f}s with confirm_timeout=2"
    # A thread of its own opens a fresh connection during the alarm: same outcome.
    started = time.monotonic()
    fresh = threading.Thread(target=notify, args=("blocked-2",))
    fresh.start()
    fresh.join(10)
    waited_fresh = time.monotonic() - started
    assert fault.unknown.get("blocked-2") == PublishTimeout.__name__
    assert waited_fresh < 2 + 3, f"notify() took {waited_fresh:.1f}s on a fresh connection"
    # The consumer is on its own connection: it keeps draining the backlog meanwhile.
    settled = fault.wait_settled(45)
    assert memory_alarm.active(), "the alarm cleared before the backlog drained"
    assert handled_at_alarm < 300, "the backlog was gone before the alarm: nothing shown"

    memory_alarm.clear()
    cleared = time.monotonic()
    wait_until(lambda: notify(f"after-{time.monotonic_ns()}"), 20, "a confirmed notify()")
    recovered = time.monotonic() - cleared
    for n in range(50):
        assert notify(f"after-alarm-{n}")
    fault.wait_settled(30)

    verdict = fault.verdict(
        "B7 memory alarm, confirm_timeout=2",
        recovery_s=recovered,
        notes=(
            f"notify raised PublishTimeout after {waited:.1f}s ({waited_fresh:.1f}s on a new "
            f"connection); backlog drained "
            f"{settled - alarm_on:.1f}s into the alarm ({300 - handled_at_alarm} msgs)"
        ),
    )
    verdict.assert_nothing_lost()
    assert verdict.parked == 0
    assert verdict.duplicates == 0
    assert runner.deaths() == []


# -- A4: a worker is killed -9 mid-stream --------------------------------------------------------


def test_1000_messages_across_a_worker_killed_minus_9_are_all_handled(fault):
    concurrency = 8  # the listener default, as every fault test that needs no other
    fault.declare()
    fault.publish(1000, sleep=0.01, fail_every=10)
    runner = fault.start_runner(workers=2)

    wait_until(lambda: fault.handled_count() >= 300, 30, "300 messages handled")
    victim = runner.live_workers()[0]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    runner.wait_started(3, timeout=20)
    replaced = time.monotonic() - killed
    settled = fault.wait_settled(60)

    verdict = fault.verdict(
        "A4 kill -9 one of 2 workers, 1000 msgs",
        recovery_s=replaced,
        notes=f"replacement consuming after {replaced:.1f}s; all handled "
        f"{settled - killed:.1f}s after the kill",
    )
    verdict.assert_nothing_lost()
    assert verdict.confirmed == 1000
    assert verdict.retried >= 50
    assert verdict.parked == 0
    # Only what the victim had handled but not yet acked comes again: at most its prefetch.
    assert verdict.duplicates <= concurrency
    assert [pid for pid, _how in runner.deaths()] == [victim]
    assert "SIGKILL" in runner.deaths()[0][1]


# -- E1: SIGTERM while busy -----------------------------------------------------------------------


def test_sigterm_while_busy_finishes_what_is_in_flight_exits_0_and_loses_nothing(fault):
    fault.declare()
    fault.publish(60, sleep=1.0)
    runner = fault.start_runner(workers=2, AMQP_LISTENER_GRACE_PERIOD="10")
    wait_until(lambda: len(fault.events()["start"]) >= 16, 20, "both workers busy")

    runner.signal(signal.SIGTERM)
    stopping = time.monotonic()
    code = runner.wait_exit(25)
    drained = time.monotonic() - stopping

    first = fault.events()
    abandoned = set(first["start"]) - set(first["done"])
    assert code == 0, runner.stderr[-3000:]
    assert not abandoned, f"in-flight messages did not finish: {describe(abandoned)}"
    assert len(first["done"]) < 60, "everything was handled before the signal: nothing shown"

    fault.start_runner(workers=2)
    fault.wait_settled(40)

    verdict = fault.verdict(
        "E1 SIGTERM busy (16 in flight), grace 10s",
        recovery_s=drained,
        notes=f"supervisor exited 0 after {drained:.1f}s; "
        f"{len(first['done'])} handled before, rest by a new runner",
    )
    verdict.assert_nothing_lost()
    assert verdict.parked == 0
    # A graceful stop acks what finished and hands back the rest: nothing runs twice.
    assert verdict.duplicates == 0
    assert max(fault.events()["start"].values()) == 1, "a message was started twice"
