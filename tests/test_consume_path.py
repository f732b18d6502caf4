"""The consume path under faults: batched acks, two connections, handler threads, copies.

Deliveries arrive on a pika connection and are acked in batches (`basic.ack(multiple=True)`
over the settled run at the head of a channel's deliveries); declares and moves go through
aio-pika on a second connection; sync handlers run on a pool that abandons stuck threads.
Each test breaks one of those on the real broker and checks the contract: nothing lost, an
ack only after `handle()` returned, every message handled, waiting for a retry, or parked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import decimal
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest
from support.proxy import TcpProxy
from support.waiting import eventually

from listener import Listener, Reject
from listener.runner.amqp_transport import Transport
from listener.runner.inbound import Subscription
from listener.runner.worker import Worker
from listener.topology import delay_queue_name

# -- helpers --------------------------------------------------------------------------------------


def channel_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings of a consuming channel closed by the broker (a refused ack, say)."""
    return [
        record.getMessage()
        for record in caplog.records
        if "channel was closed by the broker" in record.getMessage()
    ]


def subscription_of(worker: Worker, cls: type[Listener]) -> Subscription | None:
    """The subscription consuming `cls`'s queue now (None while it is being replaced)."""
    return next((s for c, s in worker.subscriptions.active.items() if c.listener is cls), None)


async def round_trip(subscription: Subscription | None, prefetch: int = 10) -> None:
    """Wait for an answer on the consuming channel: the broker has then processed every
    frame sent on it before (the acks of a flush included). The qos sent is the listener's
    own, so it changes nothing."""
    assert subscription is not None, "no subscription consumes the queue"
    answered = asyncio.get_running_loop().create_future()
    subscription.channel.basic_qos(
        prefetch_count=prefetch,
        callback=lambda _frame: answered.done() or answered.set_result(None),
    )
    await asyncio.wait_for(answered, 5)


async def take(url: str, queue: str, timeout: float = 10.0) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message in `queue`, read with aio-pika (as any client of the broker would)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        deadline = time.monotonic() + timeout
        while True:
            source = await channel.get_queue(queue, ensure=False)
            got = await source.get(no_ack=True, fail=False)
            if got is not None:
                return got
            assert time.monotonic() < deadline, f"nothing arrived in {queue!r} within {timeout}s"
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


async def publish(url: str, cls: type[Listener], message: aio_pika.Message) -> None:
    """Publish as a foreign aio-pika client would, to the listener's exchange and key."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(cls.exchange, ensure=False)
        await exchange.publish(message, cls.subscribes_to.split(".", 1)[1])
    finally:
        await connection.close()


class _Gated:
    """State shared by a gated listener and its test: calls per message, a gate for n=0."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: collections.Counter[int] = collections.Counter()


def gated_listener(unique: str, state: _Gated, *, fail_first_slow_call: bool = False) -> type:
    """A listener whose message n=0 waits for `state.gate`; every other returns at once."""

    class Gated(Listener):
        subscribes_to = f"{unique}.item"
        queue = f"{unique}.gated"
        concurrency = 10
        retry_delays = (0.2,)

        async def handle(self, message: dict[str, int]) -> None:
            n = message["n"]
            state.calls[n] += 1
            if n == 0:
                first = state.calls[0] == 1
                await state.gate.wait()
                if first and fail_first_slow_call:
                    raise RuntimeError("the slow attempt fails after its channel is gone")

    return Gated


async def slow_head_then_fast(worker: Worker, cls: Any, state: _Gated) -> Subscription:
    """Message 0 held by its handler, 1..9 handled behind it, their acks at the broker."""
    await cls.anotify({"n": 0})
    await eventually(lambda: state.calls[0] == 1)
    await cls.anotify_many([{"n": n} for n in range(1, 10)])
    consumer = worker.consumers[0]
    await eventually(lambda: consumer.counts["handled"] == 9)
    subscription = subscription_of(worker, cls)
    assert subscription is not None
    await round_trip(subscription)
    return subscription


# -- batched acks when the channel or the connection dies ------------------------------------------


async def test_a_slow_handler_ahead_of_acked_ones_is_the_only_redelivery_when_the_connection_dies(
    unique, rabbit, run_worker, settings, caplog
):
    state = _Gated()
    gated = gated_listener(unique, state)
    with TcpProxy() as proxy:
        via_proxy = settings.with_url(f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F")
        async with run_worker(gated, worker_settings=via_proxy) as worker:
            await slow_head_then_fast(worker, gated, state)
            before = worker._transport
            await asyncio.to_thread(proxy.reset)  # both connections die, mid-handler
            await eventually(lambda: worker._transport is not before and worker.ready)
            # The broker had message 0 only; it comes again, to the new channel.
            await eventually(lambda: state.calls[0] == 2)
            state.gate.set()
            consumer = worker.consumers[0]
            # Ten messages handled once each: the first attempt's dropped ack counts for none.
            await eventually(lambda: consumer.counts["handled"] == 10)
            await round_trip(subscription_of(worker, gated))

    assert state.calls == {0: 2, **{n: 1 for n in range(1, 10)}}
    assert rabbit.get(gated.queue) is None  # the redelivered one was acked, the rest were
    assert rabbit.count(f"{gated.queue}.dead") == 0
    assert channel_errors(caplog) == []  # the first attempt's ack was dropped, not sent


async def test_a_channel_closed_by_the_broker_mid_batch_loses_nothing_and_no_tag_is_acked_twice(
    unique, rabbit, run_worker, caplog
):
    state = _Gated()
    gated = gated_listener(unique, state, fail_first_slow_call=True)
    async with run_worker(gated) as worker:
        subscription = await slow_head_then_fast(worker, gated, state)
        # A tag the broker never sent: it closes the channel (406 PRECONDITION_FAILED) and
        # puts message 0 back, as it does after a double ack or a consumer timeout.
        subscription.channel.basic_ack(delivery_tag=1_000_000)
        await eventually(lambda: subscription_of(worker, gated) is not subscription)
        await eventually(lambda: state.calls[0] == 2 and worker.ready)
        # The first attempt now fails: its channel is gone, so no copy may be made of it.
        state.gate.set()
        consumer = worker.consumers[0]
        await eventually(lambda: consumer.counts["handled"] == 10)
        await round_trip(subscription_of(worker, gated))
        assert consumer.counts["retried"] == 0

    assert state.calls == {0: 2, **{n: 1 for n in range(1, 10)}}
    assert rabbit.get(gated.queue) is None
    assert rabbit.get(delay_queue_name(gated.queue, 0.2)) is None  # no copy of the orphaned attempt
    assert rabbit.count(f"{gated.queue}.dead") == 0
    assert len(channel_errors(caplog)) == 1  # the injected one; no ack went to the new channel


async def test_a_slow_handler_acked_after_the_ones_behind_it_and_across_a_pause_acks_each_tag_once(
    unique, rabbit, run_worker, caplog
):
    state = _Gated()
    gated = gated_listener(unique, state)
    async with run_worker(gated) as worker:
        subscription = await slow_head_then_fast(worker, gated, state)
        # A new consumer on the same channel: its tags follow on, message 0's stays unsettled.
        worker.pause("test")
        await eventually(lambda: not worker.ready)
        worker.resume("test")
        await eventually(lambda: worker.ready)
        await gated.anotify_many([{"n": n} for n in range(10, 20)])
        await eventually(lambda: worker.consumers[0].counts["handled"] == 19)
        state.gate.set()  # now message 0 is the head: one multiple ack, over acked tags too
        await eventually(lambda: worker.consumers[0].counts["handled"] == 20)
        await round_trip(subscription)  # answered: the channel is still open
        assert subscription_of(worker, gated) is subscription and not subscription.is_closed

    assert state.calls == {n: 1 for n in range(20)}
    assert rabbit.get(gated.queue) is None
    assert channel_errors(caplog) == []


async def test_a_queue_deleted_under_running_handlers_leaves_no_ack_for_the_new_channel(
    unique, rabbit, run_worker, caplog
):
    state = _Gated()
    gated = gated_listener(unique, state)
    async with run_worker(gated) as worker:
        subscription = await slow_head_then_fast(worker, gated, state)
        rabbit.delete_queue(gated.queue)  # the broker cancels the consumer
        await eventually(lambda: subscription_of(worker, gated) is not subscription)
        await eventually(lambda: worker.ready and rabbit.consumers(gated.queue) == 1)
        state.gate.set()  # message 0 returns: acked on its own channel, which then closes
        await gated.anotify({"n": 10})
        await eventually(lambda: state.calls[10] == 1)
        await round_trip(subscription_of(worker, gated))
        await eventually(lambda: subscription.is_closed)

    assert channel_errors(caplog) == []
    assert rabbit.get(gated.queue) is None


async def test_a_consumer_the_broker_cancels_never_runs_a_running_message_a_second_time(
    unique, rabbit, run_worker, caplog
):
    state = _Gated()
    gated = gated_listener(unique, state)
    async with run_worker(gated) as worker:
        subscription = await slow_head_then_fast(worker, gated, state)
        # What RabbitMQ does when it cancels a consumer whose queue lives on (a quorum
        # leader moving, say): the consumer ends; the channel and its unacked deliveries stay.
        await subscription.cancel()
        subscription._cancelled_by_broker(None)
        await eventually(lambda: subscription_of(worker, gated) not in (None, subscription))
        # (A quorum queue counts a cancelled consumer until its deliveries are settled.)
        await eventually(lambda: worker.ready)
        await gated.anotify({"n": 10})
        await eventually(lambda: state.calls[10] == 1)
        # Message 0 still runs: it was neither handed back nor delivered to the new consumer.
        assert state.calls[0] == 1
        assert not subscription.is_closed
        state.gate.set()
        await eventually(lambda: subscription.is_closed)  # closed once its handler returned
        await round_trip(subscription_of(worker, gated))

    assert state.calls[0] == 1
    assert channel_errors(caplog) == []
    assert rabbit.count(gated.queue) == 0  # message 0 was acked on its own channel


async def test_a_drain_sends_the_acks_of_handlers_that_return_in_the_grace_period(
    unique, rabbit, run_worker
):
    release = asyncio.Event()
    calls: collections.Counter[int] = collections.Counter()

    class Draining(Listener):
        subscribes_to = f"{unique}.item"
        queue = f"{unique}.draining"
        concurrency = 20

        async def handle(self, message: dict[str, int]) -> None:
            calls[message["n"]] += 1
            await release.wait()

    async with run_worker(Draining) as worker:
        await Draining.anotify_many([{"n": n} for n in range(20)])
        await eventually(lambda: len(calls) == 20)
        worker.request_stop("test")
        await asyncio.sleep(0)  # the drain has begun: consumers cancelled, handlers waited for
        release.set()  # all twenty return inside the grace period, one loop turn apart at most
    # The worker closed its connections: anything not acked would be back in the queue now.
    assert rabbit.get(Draining.queue) is None
    assert calls == {n: 1 for n in range(20)}
    assert worker.consumers[0].counts["handled"] == 20


# -- pause, resume and drain while messages stream in ----------------------------------------------


def streamed_listener(unique: str, handled: collections.Counter[int], max_attempts: int) -> Any:
    class Streamed(Listener):
        subscribes_to = f"{unique}.item"
        queue = f"{unique}.streamed"
        concurrency = 50

        async def handle(self, message: dict[str, int]) -> None:
            await asyncio.sleep(0.02)
            handled[message["n"]] += 1

    Streamed.max_attempts = max_attempts
    return Streamed


async def pause_four_times_while_streaming(
    worker: Worker, cls: Any, handled: collections.Counter[int], rabbit: Any, total: int
) -> None:
    """Publish `total` messages to a paused worker, then pause it four times mid-stream; at
    each pause, once its handlers returned, every message not handled is back in the queue."""
    worker.pause("test")
    await eventually(lambda: not worker.ready)
    await cls.anotify_many([{"n": n} for n in range(total)])
    worker.resume("test")
    for pause in range(1, 5):
        await eventually(lambda: len(handled) >= 250 * pause, timeout=20)  # noqa: B023
        worker.pause("test")  # deliveries keep arriving until the broker has the cancel
        await eventually(lambda: not worker.ready and not worker.consumers[0].in_flight)
        parked = rabbit.count(f"{cls.queue}.dead")
        await eventually(lambda: rabbit.count(cls.queue) + len(handled) + parked == total)  # noqa: B023
        worker.resume("test")
        await eventually(lambda: worker.ready)


async def test_pausing_and_resuming_under_load_holds_nothing_back_and_handles_each_message_once(
    unique, rabbit, run_worker
):
    handled: collections.Counter[int] = collections.Counter()
    streamed = streamed_listener(unique, handled, max_attempts=5)
    total = 1500
    async with run_worker(streamed) as worker:
        await pause_four_times_while_streaming(worker, streamed, handled, rabbit, total)
        await eventually(lambda: len(handled) == total, timeout=20)
        await round_trip(subscription_of(worker, streamed), prefetch=50)
    # Acks batched across cancels and new consumers on one channel: none lost, none doubled.
    assert set(handled.values()) == {1}
    assert rabbit.get(streamed.queue) is None
    assert rabbit.count(f"{streamed.queue}.dead") == 0


async def test_deliveries_in_transit_when_a_pause_cancels_the_consumer_are_not_counted_as_deaths(
    unique, rabbit, run_worker
):
    handled: collections.Counter[int] = collections.Counter()
    streamed = streamed_listener(unique, handled, max_attempts=1)  # one death: parked at once
    total = 1500
    async with run_worker(streamed) as worker:
        await pause_four_times_while_streaming(worker, streamed, handled, rabbit, total)
        dead = f"{streamed.queue}.dead"
        await eventually(lambda: len(handled) + rabbit.count(dead) == total, timeout=20)
    reasons = collections.Counter(p.headers["x-parked-reason"] for p, _b in rabbit.drain(dead))
    assert reasons == {}, f"parked without an attempt: {reasons}"


async def test_a_drain_while_messages_stream_in_acks_what_it_handled_and_leaves_the_rest_queued(
    unique, rabbit, run_worker
):
    handled: collections.Counter[int] = collections.Counter()
    streamed = streamed_listener(unique, handled, max_attempts=5)
    total = 1500
    async with run_worker(streamed) as worker:
        worker.pause("test")
        await eventually(lambda: not worker.ready)
        await streamed.anotify_many([{"n": n} for n in range(total)])
        worker.resume("test")
        await eventually(lambda: len(handled) >= 300, timeout=20)
    # Stopped (SIGTERM's path) while deliveries were on their way: handed back or requeued.
    left = collections.Counter(json.loads(body)["n"] for _p, body in rabbit.drain(streamed.queue))
    assert set(left) & set(handled) == set()  # nothing handled is left to run again
    assert sorted(set(left) | set(handled)) == list(range(total))  # nothing lost
    assert set(left.values()) <= {1} and set(handled.values()) == {1}  # nothing doubled


# -- the two connections ---------------------------------------------------------------------------


async def test_the_moves_connection_lost_while_consumers_subscribe_is_noticed_and_both_reopened(
    unique, rabbit, settings, monkeypatch
):
    first_transport: list[Transport] = []
    original_consume = Transport.consume

    async def consume(self: Transport, queue_name: str, prefetch: int, callback: Any) -> Any:
        if not first_transport:
            first_transport.append(self)
            # The moves connection goes while the deliveries connection subscribes.
            await self.connection.close()
        return await original_consume(self, queue_name, prefetch, callback)

    monkeypatch.setattr(Transport, "consume", consume)
    handled: list[int] = []

    class Moving(Listener):
        subscribes_to = f"{unique}.item"
        queue = f"{unique}.moving"
        max_attempts = 2
        retry_delays = (0.2,)

        async def handle(self, message: dict[str, int]) -> None:
            handled.append(message["n"])
            if len(handled) == 1:
                raise RuntimeError("the retry needs the moves connection")

    rabbit.track(Moving)
    worker = Worker([Moving], settings, install_signals=False)
    task = asyncio.create_task(worker.run())
    try:
        try:
            await eventually(
                lambda: worker.ready and worker._transport is not first_transport[0], timeout=6
            )
        except AssertionError:
            closed, noticed = first_transport[0].is_closed, worker._lost.is_set()
            raise AssertionError(
                f"no reconnect: first transport closed={closed}, loss noticed={noticed}"
            ) from None
        await Moving.anotify({"n": 1})
        await eventually(lambda: handled == [1, 1])
    finally:
        worker.request_stop("test finished")
        await asyncio.wait_for(task, 15)


async def connected_through(proxy: TcpProxy, settings: Any) -> Transport:
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
    transport = await Transport.connect(settings.with_url(url), name="consume-path close test")
    assert proxy.open_connections == 2
    return transport


async def test_closing_both_connections_is_bounded_when_the_broker_stops_answering(settings):
    with TcpProxy() as proxy:
        transport = await connected_through(proxy, settings)
        proxy.blackhole()  # no Close-Ok will ever come back
        started = time.monotonic()
        await transport.close(timeout=0.5)
        assert time.monotonic() - started < 1.5  # each connection waits its 0.5 s at most


async def test_a_connection_given_up_on_at_close_leaves_no_socket_open(settings):
    with TcpProxy() as proxy:
        transport = await connected_through(proxy, settings)
        proxy.blackhole()
        await transport.close(timeout=0.5)
        await eventually(lambda: proxy.open_connections == 0, timeout=2)


# -- sync handlers on the thread pool --------------------------------------------------------------


async def test_stuck_sync_handlers_leave_the_others_flowing_and_stop_counting_once_they_return(
    unique, rabbit, run_worker, settings
):
    release = threading.Event()
    started: list[int] = []
    handled: list[int] = []

    class Hung(Listener):
        subscribes_to = f"{unique}.item"
        queue = f"{unique}.hung"
        concurrency = 2
        timeout = 0.3
        max_attempts = 1

        def handle(self, message: dict[str, int]) -> None:
            if message["n"] < 2:
                started.append(message["n"])
                release.wait(20)
                return
            handled.append(message["n"])

    keep = settings.model_copy(update={"max_stuck_threads": 0})
    try:
        async with run_worker(Hung, worker_settings=keep) as worker:
            consumer = worker.consumers[0]
            await Hung.anotify_many([{"n": 0}, {"n": 1}])
            # Both threads of a concurrency-2 listener are stuck: the pool must not wait.
            await eventually(lambda: consumer.stuck_threads == 2)
            await Hung.anotify_many([{"n": n} for n in range(2, 22)])
            await eventually(lambda: len(handled) == 20)
            assert worker.ready and consumer.stuck_threads == 2
            release.set()
            await eventually(lambda: consumer.stuck_threads == 0)
            assert consumer.counts["parked"] == 2 and consumer.counts["handled"] == 20
    finally:
        release.set()
    assert sorted(started) == [0, 1]  # the stuck ones' late return was not a second outcome
    assert sorted(handled) == list(range(2, 22))
    reasons = [p.headers["x-parked-reason"] for p, _b in rabbit.drain(f"{Hung.queue}.dead")]
    assert reasons == ["timeout", "timeout"]


# -- what a copy keeps -----------------------------------------------------------------------------

#: One header of each kind an AMQP field table holds (as RabbitMQ reads them), nested too.
EVERY_FIELD_TYPE: dict[str, Any] = {
    "boolean": True,
    "int8": -5,
    "int16": -3000,
    "uint16": 60000,
    "int32": -70000,
    "uint32": 3_000_000_000,
    "int64": -(2**40),
    "float": 3.75,
    "decimal": decimal.Decimal("1.25"),
    "text": "héllo",
    "timestamp": dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC),
    "table": {"n": 1, "inner": {"x": "y", "ratio": 0.5}},
    "array": [1, "two", 2.5, None],
    "void": None,
}


def failing_listener(unique: str, attempts: list[int], exc: Callable[[], Exception]) -> Any:
    class Failing(Listener):
        subscribes_to = f"{unique}.item"
        queue = f"{unique}.failing"
        max_attempts = 2
        retry_delays = (0.2,)

        async def handle(self, message: dict[str, int]) -> None:
            attempts.append(message["n"])
            raise exc()

    return Failing


async def test_every_amqp_field_type_in_headers_survives_a_retry_and_a_park_with_equal_values(
    unique, rabbit, run_worker, amqp_url
):
    attempts: list[int] = []
    failing = failing_listener(unique, attempts, lambda: RuntimeError("always"))
    original = aio_pika.Message(
        b'{"n": 1}',
        headers=dict(EVERY_FIELD_TYPE),
        content_type="application/json",
        content_encoding="utf-8",
        priority=3,
        correlation_id="corr-1",
        reply_to="replies",
        timestamp=dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        expiration=60,
        type="copy.requested",
        app_id="tests",
        message_id="m-every-type",
    )
    async with run_worker(failing):
        await publish(amqp_url, failing, original)
        copy = await take(amqp_url, f"{failing.queue}.dead")  # retried once, then parked
    assert attempts == [1, 1]
    headers = dict(copy.headers)
    assert headers["x-attempts"] == 2
    kept = {key: headers.get(key) for key in EVERY_FIELD_TYPE}
    assert kept == EVERY_FIELD_TYPE
    assert {k: type(v) for k, v in kept.items()} == {
        k: type(v) for k, v in EVERY_FIELD_TYPE.items()
    }
    assert (copy.priority, copy.correlation_id, copy.reply_to) == (3, "corr-1", "replies")
    assert (copy.type, copy.app_id, copy.message_id) == ("copy.requested", "tests", "m-every-type")
    assert (copy.content_type, copy.content_encoding) == ("application/json", "utf-8")
    assert copy.timestamp == original.timestamp
    assert copy.expiration is None  # a parked message never expires...
    assert headers["x-original-expiration"] == "60000"  # ...its TTL is kept, as on the wire
    assert copy.body == original.body


async def test_a_failing_message_with_a_binary_header_is_parked_not_requeued_forever(
    unique, rabbit, run_worker, amqp_url, caplog
):
    attempts: list[int] = []
    failing = failing_listener(unique, attempts, lambda: Reject("not this one"))
    signature = bytearray(b"\x00\xffsig")
    async with run_worker(failing) as worker:
        await publish(
            amqp_url, failing, aio_pika.Message(b'{"n": 7}', headers={"signature": signature})
        )
        copy = None
        with contextlib.suppress(AssertionError):
            copy = await take(amqp_url, f"{failing.queue}.dead", timeout=5)
        moves_failed = [
            r.getMessage() for r in caplog.records if "could not move" in r.getMessage()
        ]
        assert moves_failed == [], f"{len(attempts)} attempt(s), failed moves: {moves_failed[:1]}"
        assert copy is not None
        assert worker.consumers[0].counts["parked"] == 1
    assert attempts == [7]
    assert copy.headers["signature"] == signature
    assert channel_errors(caplog) == []
