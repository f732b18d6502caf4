"""listener.testing: the in-memory broker settles deliveries as the runner does, on a virtual
clock, without RabbitMQ. (tests/conformance/ runs the same scenarios against both.)"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import listener
from listener import Listener, Middleware, Reject, Retry, Unroutable, delay
from listener._memory_publishers import MemoryBackend
from listener._pika_backend import PikaBackend
from listener.apublisher import AsyncPublisher, default_async_publisher
from listener.publisher import Publisher, default_publisher
from listener.testing import MemoryBroker, ParkedMessage, PublishedMessage


class Job(BaseModel):
    n: int


def make(
    handle: Any, *, key: str = "jobs.run", name: str = "Worker", **policy: Any
) -> type[Listener]:
    """A listener class on `key` whose handle() is `handle`, with `policy` attributes."""
    namespace = {"subscribes_to": key, "handle": handle, "queue": f"q_{name.lower()}", **policy}
    return type(name, (Listener,), namespace)


# -- a handler that raises ------------------------------------------------------------------------


def test_join_re_raises_the_handlers_exception_once_its_message_is_settled():
    def handle(self, message: Job) -> None:
        raise KeyError("no such case")

    failing = make(handle, max_attempts=3)
    with MemoryBroker(failing) as broker:
        failing.notify(n=1)
        with pytest.raises(KeyError, match="no such case"):
            broker.join()
        # Settled as the runner would: waiting for its retry, neither handled nor parked.
        assert broker.pending(failing) == 1
        assert broker.handled(failing) == []
        assert broker.parked(failing) == []


def test_a_failing_message_is_retried_then_parked_with_the_runners_headers():
    attempts: list[float] = []

    def handle(self, message: Job) -> None:
        attempts.append(broker.clock.now)
        raise ValueError(f"case {message.n} is broken")

    failing = make(handle, max_attempts=3, retry_delays=(5, 60))
    started = time.monotonic()
    with MemoryBroker(failing) as broker:
        message_id = failing.notify(n=7)
        broker.join(fail_fast=False)

    assert time.monotonic() - started < 2  # 65 s of retry delays, none of them slept
    assert attempts == [0, 5, 65]
    [parked] = broker.parked(failing)
    assert isinstance(parked, ParkedMessage)
    assert (parked.reason, parked.attempts) == ("failed", 3)
    assert parked.exception_type == "ValueError"
    assert parked.exception_message == "case 7 is broken"
    assert parked.message_id == message_id
    assert parked.body == b'{"n":7}'
    assert parked.message == Job(n=7)
    headers = parked.headers
    assert headers["x-parked-reason"] == "failed"
    assert headers["x-attempts"] == 3
    assert headers["x-listener"] == failing.name()
    assert headers["x-host"] == socket.gethostname()
    assert headers["x-pid"] == os.getpid()
    assert headers["x-original-exchange"] == "jobs"
    assert headers["x-original-routing-key"] == "run"
    assert 'raise ValueError(f"case {message.n} is broken")' in parked.traceback
    first = dt.datetime.fromisoformat(headers["x-first-failure-at"])
    last = dt.datetime.fromisoformat(headers["x-last-failure-at"])
    assert last - first == dt.timedelta(seconds=65)  # stamped on the virtual clock
    assert broker.handled(failing) == []
    assert broker.pending() == 0


def test_retry_and_reject_are_outcomes_so_fail_fast_does_not_raise_them():
    def handle(self, message: Job) -> None:
        if message.n == 1:
            raise Reject("case 1 is closed")
        raise Retry(delay=1)

    steering = make(handle, max_attempts=2, retry_delays=(1,))
    with MemoryBroker(steering, fail_fast=True) as broker:
        steering.notify(n=1)
        steering.notify(n=2)
        broker.join()

    rejected, retried = broker.parked(steering)
    assert (rejected.reason, rejected.attempts) == ("rejected", 1)
    assert rejected.exception_message == "case 1 is closed"
    assert rejected.headers["x-exception-message"] == "case 1 is closed"
    assert rejected.exception_type == "listener.errors.Reject"
    assert (retried.reason, retried.attempts) == ("failed", 2)
    assert retried.exception_type == "listener.errors.Retry"


# -- bodies that cannot be decoded ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"{not json", "application/json", "decode_error"),
        (b'{"n": "seven"}', "application/json", "validation_error"),
        (b'{"n": 1}', "application/x-python-pickle", "unsupported_content_type"),
    ],
)
def test_a_body_that_cannot_be_decoded_is_parked_at_once_without_reaching_handle(
    body, content_type, reason
):
    calls: list[Job] = []

    def handle(self, message: Job) -> None:
        calls.append(message)

    strict = make(handle, max_attempts=5)
    with MemoryBroker(strict) as broker:
        message_id = broker.publish_raw("jobs.run", body, content_type=content_type)
        broker.join()  # fail_fast: a bad body is an outcome, not a handler's exception

    assert calls == []
    [parked] = broker.parked(strict)
    assert (parked.reason, parked.attempts) == (reason, 1)
    assert parked.exception_type == "listener.DecodeFailure"
    assert parked.body == body
    assert parked.message is None
    assert parked.message_id == message_id
    assert "x-exception-traceback" not in parked.headers


def test_a_validation_error_names_the_field_but_not_the_value():
    class Typed(Listener):
        subscribes_to = "jobs.typed"

        def handle(self, message: Job) -> None: ...

    with MemoryBroker(Typed) as broker:
        broker.publish_raw("jobs.typed", b'{"n": "secret-value-42"}')
        broker.join()

    [parked] = broker.parked(Typed)
    assert "n:" in parked.exception_message
    assert "secret-value-42" not in json.dumps(parked.headers)


# -- time-outs ------------------------------------------------------------------------------------


def test_an_async_handler_that_hangs_times_out_on_the_virtual_clock_and_is_parked():
    cancelled: list[bool] = []

    async def handle(self, message: Job) -> None:
        try:
            await asyncio.Event().wait()  # nothing ever sets it
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    hanging = make(handle, timeout=600, max_attempts=2, retry_delays=(30,))
    started = time.monotonic()
    with MemoryBroker(hanging) as broker:
        hanging.notify(n=1)
        broker.join()

    assert time.monotonic() - started < 2  # two 600 s time-outs, skipped
    assert cancelled == [True, True]
    [parked] = broker.parked(hanging)
    assert (parked.reason, parked.attempts) == ("timeout", 2)
    assert parked.exception_type == "TimeoutError"
    assert "600s timeout" in parked.exception_message
    assert broker.clock.now == pytest.approx(600 + 30 + 600, abs=1)


def test_a_sync_handler_past_its_timeout_runs_to_its_end_then_counts_as_timed_out():
    finished: list[int] = []

    def handle(self, message: Job) -> None:
        time.sleep(0.05)
        finished.append(message.n)

    slow = make(handle, timeout=0.01, max_attempts=1)
    with MemoryBroker(slow) as broker:
        slow.notify(n=1)
        broker.join()

    assert finished == [1]  # not abandoned: it ran to its end
    assert broker.handled(slow) == []
    [parked] = broker.parked(slow)
    assert (parked.reason, parked.exception_type) == ("timeout", "TimeoutError")


def test_an_async_handler_sleeping_within_its_timeout_is_handled_and_the_wait_skipped():
    async def handle(self, message: Job) -> None:
        await asyncio.sleep(3600)

    patient = make(handle, timeout=7200)
    started = time.monotonic()
    with MemoryBroker(patient) as broker:
        patient.notify(n=1)
        broker.join()

    assert time.monotonic() - started < 2
    assert broker.handled(patient) == [Job(n=1)]
    assert broker.clock.now == pytest.approx(3600, abs=1)


def test_real_io_in_an_async_handler_is_waited_for_and_never_skipped_into_a_timeout():
    # A server that answers after 0.2 s of real time, and a thread job of 0.1 s: while
    # either is pending the loop must wait for real, not jump to the 1 s deadline.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_late() -> None:
        connection, _ = server.accept()
        with connection:
            time.sleep(0.2)
            connection.sendall(b"ok\n")

    threading.Thread(target=answer_late, daemon=True).start()

    async def handle(self, message: Job) -> None:
        await asyncio.to_thread(time.sleep, 0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"ok\n"
        writer.close()
        await writer.wait_closed()

    networked = make(handle, timeout=1, max_attempts=1)
    try:
        with MemoryBroker(networked) as broker:
            networked.notify(n=1)
            broker.join()
    finally:
        server.close()

    assert broker.handled(networked) == [Job(n=1)]
    assert broker.clock.now < 1


# -- Retry(delay) ---------------------------------------------------------------------------------


def test_retry_with_a_delay_moves_the_virtual_clock_by_exactly_that_delay():
    seen: list[float] = []

    def handle(self, message: Job) -> None:
        seen.append(broker.clock.now)
        if len(seen) == 1:
            raise Retry(delay=7)  # not in retry_delays: exact, as the runner's delay levels

    later = make(handle, retry_delays=(1,))
    started = time.monotonic()
    with MemoryBroker(later) as broker:
        later.notify(n=1)
        broker.join()

    assert time.monotonic() - started < 2
    assert seen == [0, 7]
    assert broker.handled(later) == [Job(n=1)]


def test_join_without_waiting_for_retries_leaves_them_until_advance_brings_their_time():
    calls: list[int] = []

    def handle(self, message: Job) -> None:
        calls.append(message.n)
        if len(calls) == 1:
            raise Retry(delay=60)

    later = make(handle, retry_delays=(60,))
    with MemoryBroker(later) as broker:
        later.notify(n=1)
        broker.join(wait_for_retries=False)
        assert (calls, broker.pending(later), broker.clock.now) == ([1], 1, 0)
        broker.advance(59)
        broker.join(wait_for_retries=False)
        assert calls == [1]
        broker.advance(1)
        broker.join(wait_for_retries=False)
        assert calls == [1, 1]
        assert broker.pending() == 0
        with pytest.raises(ValueError, match=">= 0"):
            broker.advance(-1)


def test_attempts_are_counted_from_the_x_attempts_header_as_the_runner_counts_them():
    def handle(self, message: Job) -> None:
        raise RuntimeError("still broken")

    counted = make(handle, max_attempts=5)
    with MemoryBroker(counted) as broker:
        broker.publish_raw("jobs.run", b'{"n": 1}', headers={"x-attempts": 4})
        # Unsettled deliveries are no deaths: below the delivery limit (3 x 5) it runs.
        broker.publish_raw("jobs.run", b'{"n": 2}', headers={"x-delivery-count": 14})
        broker.publish_raw("jobs.run", b'{"n": 3}', headers={"x-delivery-count": 15})
        broker.join(fail_fast=False)

    failed, below_limit, at_limit = sorted(broker.parked(counted), key=lambda p: p.body)
    assert (failed.reason, failed.attempts) == ("failed", 5)
    assert (below_limit.reason, below_limit.attempts) == ("failed", 5)
    assert (at_limit.reason, at_limit.attempts) == ("delivery_limit", 1)
    assert "x-delivery-count" not in at_limit.headers


# -- routing --------------------------------------------------------------------------------------


def test_publishing_where_nothing_is_bound_raises_unroutable_with_the_message_id():
    bound = make(lambda self, message: None, key="jobs.run")
    with MemoryBroker(bound) as broker:
        with pytest.raises(Unroutable) as unbound:
            listener.publish("jobs.other", {"n": 1})
        assert unbound.value.message_id in str(unbound.value)
        assert "broker.subscribe" in str(unbound.value)
        with pytest.raises(Unroutable, match="exchange 'nowhere' does not exist"):
            listener.publish("nowhere.run", {"n": 1})
        assert broker.published == []


def test_a_handler_notifying_an_unsubscribed_listener_fails_with_unroutable():
    class Downstream(Listener):
        subscribes_to = "downstream.go"

        def handle(self, message: Job) -> None: ...

    def handle(self, message: Job) -> None:
        Downstream.notify(n=message.n)

    upstream = make(handle)
    with MemoryBroker(upstream) as broker:
        upstream.notify(n=1)
        with pytest.raises(Unroutable, match="'downstream' does not exist"):
            broker.join()


def test_bind_makes_a_foreign_address_routable_and_its_messages_are_only_recorded():
    def handle(self, message: Job) -> None:
        listener.publish("billing.invoice.created", {"job": message.n})

    invoicing = make(handle)
    with MemoryBroker(invoicing) as broker:
        broker.bind("billing.invoice.*")
        invoicing.notify(n=3)
        broker.join()

    assert [m.address for m in broker.published] == ["jobs.run", "billing.invoice.created"]
    assert broker.published[1].json() == {"job": 3}


def test_two_listeners_on_one_key_each_get_a_copy():
    first = make(lambda self, message: None, name="First")
    second = make(lambda self, message: None, name="Second")
    with MemoryBroker(first, second) as broker:
        listener.publish("jobs.run", {"n": 1})
        broker.join()

    assert broker.handled(first) == [{"n": 1}]
    assert broker.handled(second) == [{"n": 1}]


def test_a_hash_binding_gets_keys_of_zero_and_more_words_and_a_star_exactly_one():
    hashed = make(lambda self, message: None, key="audit.user.#", name="Hash")
    starred = make(lambda self, message: None, key="audit.user.*", name="Star")
    with MemoryBroker(hashed, starred) as broker:
        for key in ("user", "user.created", "user.created.twice"):
            listener.publish(f"audit.{key}", {"key": key})
        broker.join()

    assert [m["key"] for m in broker.handled(hashed)] == [
        "user",
        "user.created",
        "user.created.twice",
    ]
    assert [m["key"] for m in broker.handled(starred)] == ["user.created"]


def test_a_handler_that_notifies_another_listener_is_followed_in_the_same_join():
    class Second(Listener):
        subscribes_to = "chain.second"

        async def handle(self, message: Job) -> None:
            await Third.anotify(n=message.n + 1)

    class Third(Listener):
        subscribes_to = "chain.third"

        def handle(self, message: Job) -> None: ...

    def handle(self, message: Job) -> None:
        Second.notify_many([Job(n=message.n + 1)])

    first = make(handle, key="chain.first")
    with MemoryBroker(first, Second, Third) as broker:
        first.notify(n=1)
        broker.join()

    assert broker.handled(Third) == [Job(n=3)]
    assert [m.address for m in broker.published] == ["chain.first", "chain.second", "chain.third"]


# -- what was published ---------------------------------------------------------------------------


async def test_every_publishing_call_is_recorded_with_what_the_broker_took():
    class Recorded(Listener):
        subscribes_to = "rec.*"

        def handle(self, message: Job) -> None: ...

    async with MemoryBroker(Recorded) as broker:
        first = await Recorded.anotify(n=1, routing_key="a", headers={"x-user": "ada"})
        await Recorded.anotify_many([Job(n=2)], routing_key="b")
        await listener.apublish("rec.c", {"n": 3})
        Recorded.notify(Job(n=4), routing_key="d")

    published = broker.published
    assert all(isinstance(m, PublishedMessage) for m in published)
    assert [(m.exchange, m.routing_key) for m in published] == [
        ("rec", "a"),
        ("rec", "b"),
        ("rec", "c"),
        ("rec", "d"),
    ]
    assert [m.json() for m in published] == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]
    assert published[0].message_id == first
    assert published[0].headers == {"x-user": "ada"}
    assert published[0].body == b'{"n":1}'
    assert published[0].content_type == "application/json"
    assert published[3].decode(Recorded) == Job(n=4)
    assert len({m.message_id for m in published}) == 4


def test_notify_still_validates_and_nothing_is_published_when_it_fails():
    class Strict(Listener):
        subscribes_to = "strict.go"

        def handle(self, message: Job) -> None: ...

    with MemoryBroker(Strict) as broker:
        with pytest.raises(listener.InvalidMessage, match="n"):
            Strict.notify(n="not a number")
        assert broker.published == []


# -- where handlers run, and the seam -------------------------------------------------------------


def test_join_runs_sync_handlers_on_its_thread_and_async_ones_on_a_private_loop():
    where: dict[str, Any] = {}

    class SyncOne(Listener):
        subscribes_to = "where.sync"

        def handle(self, message: Job) -> None:
            where["sync"] = threading.current_thread()

    class AsyncOne(Listener):
        subscribes_to = "where.async"

        async def handle(self, message: Job) -> None:
            where["async"] = asyncio.get_running_loop()

    with MemoryBroker(SyncOne, AsyncOne) as broker:
        SyncOne.notify(n=1)
        AsyncOne.notify(n=1)
        broker.join()

    assert where["sync"] is threading.current_thread()
    assert isinstance(where["async"], asyncio.AbstractEventLoop)
    assert where["async"].is_closed()  # closed with the broker


async def test_ajoin_runs_async_handlers_on_the_running_loop_and_sync_ones_on_a_thread():
    where: dict[str, Any] = {}

    class SyncOne(Listener):
        subscribes_to = "where.sync"

        def handle(self, message: Job) -> None:
            where["sync"] = threading.current_thread()

    class AsyncOne(Listener):
        subscribes_to = "where.async"

        async def handle(self, message: Job) -> None:
            where["async"] = asyncio.get_running_loop()

    async with MemoryBroker(SyncOne, AsyncOne) as broker:
        await SyncOne.anotify(n=1)
        await AsyncOne.anotify(n=1)
        await broker.ajoin()

    assert where["async"] is asyncio.get_running_loop()
    assert where["sync"] is not threading.current_thread()
    assert broker.handled(SyncOne) == broker.handled(AsyncOne) == [Job(n=1)]


async def test_ajoin_re_raises_the_first_exception_too():
    async def handle(self, message: Job) -> None:
        raise LookupError("gone")

    failing = make(handle)
    async with MemoryBroker(failing) as broker:
        await failing.anotify(n=1)
        with pytest.raises(LookupError, match="gone"):
            await broker.ajoin()
        await broker.ajoin(fail_fast=False)
    assert broker.parked(failing)[0].reason == "failed"


async def test_the_default_publishers_are_the_brokers_only_while_it_is_active():
    broker = MemoryBroker()
    # One publisher class, two backends: outside the broker, the default sends on pika.
    assert isinstance(default_publisher()._backend, PikaBackend)
    assert isinstance(broker.publisher._backend, MemoryBackend)
    with broker:
        assert default_publisher() is broker.publisher
        assert default_async_publisher() is broker.async_publisher
        assert isinstance(broker.publisher, Publisher)
        assert isinstance(broker.async_publisher, AsyncPublisher)
    assert default_publisher() is not broker.publisher
    assert default_async_publisher() is not broker.async_publisher
    await default_async_publisher().aclose()


async def test_no_method_of_the_brokers_publishers_can_open_a_connection(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the memory publishers opened a broker connection")

    monkeypatch.setattr("listener._nodes.connect", refuse)
    monkeypatch.setattr("listener._nodes.aconnect", refuse)
    job = make(lambda self, message: None)
    with MemoryBroker(job) as broker:
        publisher, async_publisher = broker.publisher, broker.async_publisher
        publisher.publish(job.subscribes_to, {"n": 1})
        publisher.publish_body(job.exchange, "run", b'{"n":2}')
        await async_publisher.publish(job.subscribes_to, {"n": 3})
        await async_publisher.publish_body(job.exchange, "run", b'{"n":4}')
        await async_publisher.publish_bodies(job.exchange, "run", [b'{"n":5}', b'{"n":6}'])
        job.notify_many([Job(n=7)])
        publisher.close()
        await async_publisher.aclose()
        assert "published=" in repr(publisher) and "published=" in repr(async_publisher)
        await broker.ajoin()
    assert sorted(message["n"] for message in broker.handled(job)) == [1, 2, 3, 4, 5, 6, 7]


def test_middleware_hooks_fire_around_each_delivery_as_in_a_worker():
    events: list[tuple[str, ...]] = []

    class Spy(Middleware):
        def before_handle(self, delivery):
            events.append(("before", str(delivery.attempt)))

        def on_retry(self, delivery, *, delay, failure):
            events.append(("retry", f"{delay:g}"))

        def on_park(self, delivery, *, reason, failure):
            events.append(("park", reason))

        def after_handle(self, delivery, *, outcome, failure, duration):
            events.append(("after", outcome))

    def handle(self, message: Job) -> None:
        if message.n == 2:
            raise ValueError("no")

    watched = make(handle, max_attempts=2, retry_delays=(2,))
    with MemoryBroker(watched, middleware=[Spy()]) as broker:
        watched.notify(n=1)
        watched.notify(n=2)
        broker.join(fail_fast=False)

    assert events == [
        ("before", "1"),
        ("after", "handled"),
        ("before", "1"),
        ("retry", "2"),
        ("after", "retried"),
        ("before", "2"),
        ("park", "failed"),
        ("after", "parked"),
    ]


# -- bad usage ------------------------------------------------------------------------------------


async def test_join_in_async_code_says_to_use_ajoin():
    async with MemoryBroker() as broker:
        with pytest.raises(RuntimeError, match=r"await broker\.ajoin"):
            broker.join()


def test_asking_about_a_listener_that_is_not_subscribed_names_it_and_the_fix():
    outsider = make(lambda self, message: None, name="Outsider")
    broker = MemoryBroker()
    for question in (broker.handled, broker.parked, broker.pending):
        with pytest.raises(ValueError, match=r"Outsider is not subscribed.*subscribe\(Outsider\)"):
            question(outsider)


def test_a_second_active_broker_is_refused():
    with MemoryBroker(), pytest.raises(RuntimeError, match="another MemoryBroker is active"):
        MemoryBroker().__enter__()


def test_a_sync_handler_under_join_sees_no_event_loop_and_may_run_one():
    results: list[int] = []

    async def double(n: int) -> int:
        return 2 * n

    def handle(self, message: Job) -> None:
        results.append(asyncio.run(double(message.n)))

    runner = make(handle)
    with MemoryBroker(runner) as broker:
        runner.notify(n=4)
        broker.join()
    assert results == [8]


def test_the_broker_delivers_through_the_runners_consumer_on_the_memory_transport():
    from listener._memory_transport import MemoryTransport
    from listener.runner.consumer import Consumer

    counted = make(lambda self, message: None)
    with MemoryBroker(counted) as broker:
        counted.notify(n=1)
        broker.join()
    consumer = broker._deliveries.consumers[counted]
    assert type(consumer) is Consumer
    assert isinstance(consumer.transport, MemoryTransport)
    assert consumer.counts["handled"] == 1


def test_a_retry_outside_retry_delays_carries_its_route_and_waits_whole_steps():
    seen: list[tuple[float, object]] = []
    headers: dict[str, Any] = {}

    class Headers(Middleware):
        def before_handle(self, delivery: Any) -> None:
            headers.clear()
            headers.update(delivery.headers)

    def handle(self, message: Job) -> None:
        seen.append((broker.clock.now, headers.get("CC")))
        if len(seen) == 1:
            raise Retry(delay=0.3)

    stepping = make(handle)
    with MemoryBroker(stepping, middleware=[Headers()]) as broker:
        stepping.notify(n=1)
        broker.join()
    assert seen[0] == (0.0, None)
    assert seen[1][0] == 0.375  # 0.3 s rounded up to whole 0.125 s steps, never early
    # As RabbitMQ delivers it, CC and all: the bits, and the key back to its queue.
    assert seen[1][1] == [delay.bits_key(3), delay.target_key(stepping.queue)]


def test_join_on_a_broker_that_is_not_active_is_refused():
    with pytest.raises(RuntimeError, match="not active"):
        MemoryBroker().join()


def test_join_from_inside_a_handler_is_refused():
    def handle(self, message: Job) -> None:
        broker.join()

    reentrant = make(handle, max_attempts=1)
    with MemoryBroker(reentrant) as broker:
        reentrant.notify(n=1)
        with pytest.raises(RuntimeError, match="running already"):
            broker.join()


def test_subscribing_what_is_not_a_concrete_listener_is_refused():
    class Base(Listener, abstract=True):
        pass

    with pytest.raises(TypeError, match="abstract"):
        MemoryBroker(Base)
    with pytest.raises(TypeError, match="Listener subclasses"):
        MemoryBroker(object)  # type: ignore[arg-type]


def test_two_listeners_sharing_a_queue_are_refused():
    one = make(lambda self, message: None, name="One")
    other = make(lambda self, message: None, name="Other", queue="q_one")
    with pytest.raises(ValueError, match="both use queue 'q_one'"):
        MemoryBroker(one, other)


def test_handlers_notifying_each_other_forever_stop_with_an_error():
    def handle(self, message: Job) -> None:
        loop.notify(n=message.n + 1)

    loop = make(handle)
    with MemoryBroker(loop) as broker:
        broker.max_deliveries = 50
        loop.notify(n=1)
        with pytest.raises(RuntimeError, match=r"50 deliveries.*in a loop"):
            broker.join()


def test_a_handler_calling_sys_exit_stops_join_and_its_message_stays_queued():
    def handle(self, message: Job) -> None:
        sys.exit(3)

    exiting = make(handle)
    with MemoryBroker(exiting) as broker:
        exiting.notify(n=1)
        with pytest.raises(RuntimeError, match="raised SystemExit"):
            broker.join()
        assert broker.pending(exiting) == 1
        assert broker.parked(exiting) == []


# -- the pytest fixture ---------------------------------------------------------------------------


def test_the_memory_broker_fixture_is_an_active_broker(memory_broker):
    fixture = make(lambda self, message: None)
    memory_broker.subscribe(fixture)
    assert memory_broker.active
    fixture.notify(n=1)
    memory_broker.join()
    assert memory_broker.handled(fixture) == [{"n": 1}]  # no annotation: the JSON value


def test_the_plugin_gives_any_project_the_fixture_and_closes_the_broker_after_each_test(
    tmp_path: Path,
):
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel
            from listener import Listener, _redirect

            class Job(BaseModel):
                n: int

            class Worker(Listener):
                subscribes_to = "user.job"

                def handle(self, message: Job) -> None:
                    if message.n < 0:
                        raise ValueError("negative")

            def test_handles(memory_broker):
                memory_broker.subscribe(Worker)
                Worker.notify(n=1)
                memory_broker.join()
                assert memory_broker.handled(Worker) == [Job(n=1)]

            def test_fails_fast(memory_broker):
                memory_broker.subscribe(Worker)
                Worker.notify(n=-1)
                memory_broker.join()

            def test_no_broker_is_left_active():
                assert _redirect.active is None
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "1 failed, 2 passed" in result.stdout, result.stdout + result.stderr
    assert "ValueError: negative" in result.stdout
