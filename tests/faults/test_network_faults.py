"""Network faults between client and broker, through the test's TCP proxy (faults/netfaults.py).

Same bookkeeping as the broker faults (faults/harness.py): confirmed messages are never
lost, duplicates are counted and bounded, recovery is timed. The proxy forwards to the
session's own node; the faults are C1 to C4 of the report table.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator

import pytest

from faults.harness import wait_until
from faults.netfaults import FaultProxy
from faults.payload import item
from listener.apublisher import AsyncPublisher
from listener.errors import PublishError
from listener.publisher import Publisher
from listener.settings import Settings

pytestmark = pytest.mark.slow

HEARTBEAT = 2
BIG = 200_000  # bytes of padding: a body that spans several AMQP frames (frame_max 128 KiB)


@pytest.fixture
def proxy(node) -> Iterator[FaultProxy]:
    with FaultProxy(target_port=node.port) as started:
        yield started


def url_of(proxy: FaultProxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"


# -- C1: connection reset in the middle of a publish burst -----------------------------------


def test_resets_during_a_publish_burst_leave_every_call_confirmed_or_raised_and_lose_nothing(
    fault, proxy
):
    runner = fault.start_runner(workers=2)
    publisher = fault.publisher(url=url_of(proxy))
    gaps = []

    # Any exception other than a PublishError escapes the publishing thread and fails here.
    with fault.publishing(600, publisher=publisher, pause_after_error=0.0, timeout=60):
        for round_ in range(1, 6):
            fault.wait_confirmed(100 * round_)
            before = len(fault.confirmed)
            proxy.reset()
            reset_at = time.monotonic()
            wait_until(lambda b=before: len(fault.confirmed) > b, 15, "a confirm after the reset")
            gaps.append(time.monotonic() - reset_at)
    settled = fault.wait_settled(40)

    verdict = fault.verdict(
        "C1 proxy reset x5 mid-publish burst",
        recovery_s=max(gaps),
        notes=f"publisher connections opened: {proxy.accepted}; settled "
        f"{settled - reset_at:.1f}s after the last reset",
    )
    verdict.assert_nothing_lost()
    assert verdict.confirmed == 600
    assert proxy.accepted >= 6, "the publisher did not reconnect after each reset"
    assert set(fault.unknown.values()) <= {"PublishConnectionLost", "PublishUnreachable"}
    assert verdict.parked == 0
    assert verdict.duplicates == 0  # the consumer was never disturbed
    assert runner.deaths() == []


# -- C2: a partition (half-open TCP) between a worker and the broker --------------------------


def test_a_partition_longer_than_two_heartbeats_is_detected_and_the_worker_recovers(fault, proxy):
    concurrency = 4
    runner = fault.start_runner(
        workers=1,
        url=url_of(proxy),
        FAULT_CONCURRENCY=str(concurrency),
        AMQP_LISTENER_HEARTBEAT=str(HEARTBEAT),
    )
    fault.publish(200, sleep=0.05)  # straight to the node; the worker reads through the proxy
    wait_until(lambda: fault.handled_count() >= 20, 20, "20 messages handled")

    # Nothing passes and no close is passed on: only the worker's own heartbeat check can
    # find out. The broker finds out by its heartbeat too and requeues the unacked messages.
    proxy.partition()
    cut_off = time.monotonic()
    wait_until(
        lambda: "connection to the broker lost" in runner.stderr,
        8 * HEARTBEAT,
        "the worker to notice the dead connection",
    )
    detected = time.monotonic() - cut_off
    fault.publish(100, sleep=0.05)  # more work queues up meanwhile
    time.sleep(max(0.0, cut_off + 3 * HEARTBEAT - time.monotonic()))
    proxy.heal()
    healed = time.monotonic()
    wait_until(lambda: "reconnected to " in runner.stderr, 30, "the worker to reconnect")
    reconnected = time.monotonic() - healed
    settled = fault.wait_settled(45)

    # The proxy stamps with its event loop's clock, which is time.monotonic().
    broker_side = f"{proxy.hidden_closes[0] - cut_off:.1f}s" if proxy.hidden_closes else "never"
    verdict = fault.verdict(
        f"C2 partition, heartbeat {HEARTBEAT}s",
        recovery_s=reconnected,
        notes=f"worker noticed after {detected:.1f}s, broker closed its side after "
        f"{broker_side}; reconnected {reconnected:.1f}s and all handled "
        f"{settled - healed:.1f}s after the heal",
    )
    verdict.assert_nothing_lost()
    # aiormq declares a peer dead after (heartbeat + 1) * 3 s without a frame, checked
    # every heartbeat / 2 s; one more heartbeat of slack for a loaded machine.
    assert detected <= (HEARTBEAT + 1) * 3 + 2 * HEARTBEAT, f"dead {detected:.1f}s unnoticed"
    assert verdict.parked == 0
    # What the worker finished while its acks fell into the partition is delivered again.
    assert verdict.duplicates <= concurrency
    assert runner.deaths() == [], "the worker died instead of reconnecting"


# -- C3: the connection is cut in the middle of a large frame ----------------------------------


def test_connections_cut_mid_frame_on_large_bodies_never_hand_over_a_truncated_message(fault, node):
    with (
        FaultProxy(target_port=node.port) as to_worker,
        FaultProxy(target_port=node.port) as from_publisher,
    ):
        runner = fault.start_runner(workers=1, url=url_of(to_worker), FAULT_CONCURRENCY="1")
        recoveries = []
        # Broker -> worker: the next delivery is cut inside its second, then its first,
        # body frame. The worker reconnects and gets the whole message again.
        for offset in (150_000, 60_000):
            handled = fault.handled_count()
            to_worker.cut_once("down", offset)
            fault.publish(3, size=BIG)
            assert to_worker.wait_cut(15), "no delivery crossed the armed cut"
            cut_at = time.monotonic()
            wait_until(lambda h=handled: fault.handled_count() >= h + 3, 30, "3 big messages")
            recoveries.append(time.monotonic() - cut_at)

        # Publisher -> broker: a publish cut inside its body raises and never arrives whole.
        publisher = fault.publisher(url=url_of(from_publisher))
        assert fault.send(publisher, "c3-warm-up", size=BIG)
        from_publisher.cut_once("up", 100_000)
        assert not fault.send(publisher, "c3-cut", size=BIG)
        assert from_publisher.wait_cut(0)
        for n in range(3):
            assert fault.send(publisher, f"c3-after-{n}", size=BIG)
        fault.wait_settled(40)

    verdict = fault.verdict(
        "C3 cut mid-frame, 200 KB bodies (2 down, 1 up)",
        recovery_s=max(recoveries),
        notes="cut -> whole message handled: " + ", ".join(f"{r:.1f}s" for r in recoveries),
    )
    assert fault.unknown["c3-cut"] == "PublishConnectionLost"
    assert "c3-cut" not in fault.handled(), "a publish cut mid-body reached the handler"
    verdict.assert_nothing_lost()
    assert verdict.parked == 0, "a body arrived undecodable (truncated) and was parked"
    assert to_worker.cuts == 2
    assert to_worker.accepted >= 3, "the worker did not reconnect after each cut"
    assert verdict.duplicates == 0  # a cut delivery was never handled: nothing to repeat
    assert runner.deaths() == []


# -- C4: latency ----------------------------------------------------------------------------------


def test_latency_slows_confirms_without_losing_them_and_notify_keeps_its_timeout(fault, proxy):
    runner = fault.start_runner(workers=1)
    patient = fault.publisher(url=url_of(proxy), confirm_timeout=6)
    strict = fault.publisher(url=url_of(proxy), confirm_timeout=1)

    proxy.delay(0.2)  # 0.4 s round trip: both publishers connect and publish through it
    assert fault.send(patient, "c4-warm-patient")
    assert fault.send(strict, "c4-warm-strict")
    took = []
    for n in range(5):
        started = time.monotonic()
        assert fault.send(patient, f"c4-slow-{n}")
        took.append(time.monotonic() - started)
    assert min(took) >= 0.4, f"confirms came faster than the round trip: {took}"

    proxy.delay(1.5)  # a 3 s round trip: over the strict publisher's 1 s confirm timeout
    started = time.monotonic()
    assert not fault.send(strict, "c4-late")
    waited = time.monotonic() - started
    assert fault.unknown["c4-late"] == "PublishTimeout"
    assert 0.9 <= waited < 1.0 + 1.0, f"notify() gave up after {waited:.1f}s, not ~1s"
    started = time.monotonic()
    assert fault.send(patient, "c4-patient"), "a confirm inside the timeout was not waited for"
    patient_took = time.monotonic() - started

    proxy.delay(0)
    fault.wait_settled(30)
    verdict = fault.verdict(
        "C4 latency 0.2s then 1.5s per direction",
        recovery_s=None,
        notes=f"confirm at 0.4s RTT took {min(took):.2f}-{max(took):.2f}s; at 3s RTT the "
        f"1s timeout raised after {waited:.2f}s, the 6s one confirmed in {patient_took:.1f}s",
    )
    verdict.assert_nothing_lost()
    assert 3.0 <= patient_took < 6.0
    assert verdict.parked == 0
    assert verdict.duplicates == 0
    assert runner.deaths() == []


# -- a publish that has to (re)connect through a dead network -----------------------------------


async def test_a_publish_that_must_connect_through_a_partition_gives_up_within_its_timeout(
    fault, proxy
):
    timeout = 2.0
    settings = Settings(url=url_of(proxy), confirm_timeout=timeout, connect_timeout=timeout)
    sync_publisher, async_publisher = Publisher(settings), AsyncPublisher(settings)
    # TCP connects (the proxy answers) but no byte gets through: the AMQP handshake hangs,
    # as it does behind a partition or a stateful firewall that dropped the route.
    proxy.partition()
    try:
        started = time.monotonic()
        with pytest.raises(PublishError):
            await async_publisher.publish(fault.address, item("async-1"))
        async_took = time.monotonic() - started
        # aio-pika does not close the Connection object of a connect that failed; its
        # __del__ schedules close() on whichever thread collects it. Collect it here, on
        # the loop, rather than on the publishing thread below (a "never awaited" warning).
        gc.collect()
        await asyncio.sleep(0.1)

        started = time.monotonic()
        with pytest.raises(PublishError):
            await asyncio.to_thread(sync_publisher.publish, fault.address, item("sync-1"))
        sync_took = time.monotonic() - started
    finally:
        proxy.heal()
        sync_publisher.close()
        await async_publisher.aclose()

    print(f"through a partition: anotify gave up after {async_took:.1f}s, notify {sync_took:.1f}s")
    assert async_took < timeout + 1.5
    assert sync_took < timeout + 1.5, (
        f"notify() blocked {sync_took:.1f}s opening its connection although "
        f"connect_timeout={timeout:g}s (anotify gave up after {async_took:.1f}s)"
    )
