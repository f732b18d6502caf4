"""The contract's outcome table, row by row, against the real broker and an in-process worker.

Each test declares its own listener (unique exchange and queue names, short retry delays and
time-outs), sends messages, and checks the queues from outside with the `rabbit` helper:
what was acked, what went through the delay queues, what was parked and with which headers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pydantic
import pytest
from pydantic import BaseModel
from support.proxy import TcpProxy
from support.waiting import eventually

import listener
from listener import Listener, Settings, delay
from listener.apublisher import default_async_publisher
from listener.runner.worker import EXIT_RECYCLE, Worker


class Item(BaseModel):
    n: int


class Job(BaseModel):
    n: int
    fail: bool = False


@pytest.fixture(autouse=True)
async def _close_the_loops_publisher() -> AsyncIterator[None]:
    """anotify() opens one connection per event loop: close this test's when it ends."""
    yield
    await default_async_publisher().aclose()


async def parked(rabbit: Any, cls: type[Listener], timeout: float = 15.0) -> tuple[Any, bytes]:
    """The next message parked in `cls`'s dead-letter queue (waiting off the event loop)."""
    return await asyncio.to_thread(rabbit.wait_message, f"{cls.queue}.dead", timeout)


async def settle(rabbit: Any, cls: type[Listener]) -> None:
    """Wait until `cls`'s queue holds no ready message (poll with a deadline)."""
    await eventually(lambda: rabbit.count(cls.queue) == 0)


def headers_of(properties: Any) -> dict[str, Any]:
    return dict(properties.headers or {})


# -- handle returns -------------------------------------------------------------------------------


async def test_a_handler_that_returns_gets_its_message_acked_and_nothing_parked(
    unique, rabbit, run_worker
):
    seen: list[Item] = []

    class Fine(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.fine"

        def handle(self, message: Item) -> None:
            seen.append(message)

    async with run_worker(Fine) as worker:
        await Fine.anotify(n=1)
        await Fine.anotify(Item(n=2))
        await eventually(lambda: worker.consumers[0].counts["handled"] == 2)
        await settle(rabbit, Fine)

    assert sorted(item.n for item in seen) == [1, 2]
    assert all(isinstance(item, Item) for item in seen)
    assert rabbit.count(Fine.queue) == 0
    assert rabbit.count(f"{Fine.queue}.dead") == 0


# -- handle raises --------------------------------------------------------------------------------


async def test_a_handler_that_always_raises_is_retried_then_parked_with_its_story(
    unique, rabbit, run_worker
):
    calls: list[float] = []

    class AlwaysBroken(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.always_broken"
        max_attempts = 3
        retry_delays = (0.1, 0.2)

        def handle(self, message: Item) -> None:
            calls.append(time.monotonic())
            raise ValueError("always broken")

    async with run_worker(AlwaysBroken):
        message_id = await AlwaysBroken.anotify(n=1)
        properties, body = await parked(rabbit, AlwaysBroken)
        await settle(rabbit, AlwaysBroken)

    assert len(calls) == 3  # attempts 1, 2 and 3, then no more
    assert calls[1] - calls[0] >= 0.1
    assert calls[2] - calls[1] >= 0.2
    headers = headers_of(properties)
    assert headers["x-parked-reason"] == "failed"
    assert headers["x-attempts"] == 3
    assert headers["x-exception-type"] == "ValueError"
    assert headers["x-exception-message"] == "always broken"
    assert 'raise ValueError("always broken")' in headers["x-exception-traceback"]
    assert headers["x-listener"] == AlwaysBroken.name()
    assert headers["x-host"] == socket.gethostname()
    assert headers["x-pid"] == os.getpid()
    first = dt.datetime.fromisoformat(headers["x-first-failure-at"])
    last = dt.datetime.fromisoformat(headers["x-last-failure-at"])
    assert first.utcoffset() == dt.timedelta(0)
    assert first < last
    assert last - first >= dt.timedelta(seconds=0.25)
    assert headers["x-original-exchange"] == unique
    assert headers["x-original-routing-key"] == "key"
    assert properties.message_id == message_id
    assert json.loads(body) == {"n": 1}
    assert rabbit.count(f"{AlwaysBroken.queue}.dead") == 0  # parked once, not once per attempt
    assert rabbit.count(f"{AlwaysBroken.queue}.retry.100ms") == 0
    assert rabbit.count(f"{AlwaysBroken.queue}.retry.200ms") == 0


async def test_a_parked_message_keeps_its_body_properties_and_headers(unique, rabbit, run_worker):
    class Broken(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.broken"
        max_attempts = 2
        retry_delays = (0.1,)

        async def handle(self, message: Item) -> None:
            raise RuntimeError("nope")

    # Odd spacing and key order: the parked body must be these bytes, not a re-encoding.
    original = b'{ "n" :  7 ,"extra":"\\u00e9t\xc3\xa9" }'
    async with run_worker(Broken):
        rabbit.publish(
            unique,
            "key",
            original,
            message_id="order-7",
            content_type="application/json",
            timestamp=1_700_000_000,
            correlation_id="corr-7",
            app_id="billing",
            type="order.created",
            delivery_mode=2,
            headers={"tenant": "acme", "x-custom": "kept"},
        )
        properties, body = await parked(rabbit, Broken)

    assert body == original
    assert properties.message_id == "order-7"
    assert properties.content_type == "application/json"
    assert properties.timestamp == 1_700_000_000
    assert properties.correlation_id == "corr-7"
    assert properties.app_id == "billing"
    assert properties.type == "order.created"
    assert properties.delivery_mode == 2
    headers = headers_of(properties)
    assert headers["tenant"] == "acme"
    assert headers["x-custom"] == "kept"
    assert headers["x-attempts"] == 2
    assert headers["x-exception-type"] == "RuntimeError"


async def test_a_transient_failure_is_retried_and_handled_once_on_the_third_attempt(
    unique, rabbit, run_worker
):
    calls: list[int] = []
    handled: list[int] = []

    class Flaky(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.flaky"
        max_attempts = 5
        retry_delays = (0.1, 0.1)

        def handle(self, message: Item) -> None:
            calls.append(message.n)
            if len(calls) <= 2:
                raise ConnectionError("broker of the downstream service is down")
            handled.append(message.n)

    async with run_worker(Flaky) as worker:
        await Flaky.anotify(n=3)
        await eventually(lambda: handled == [3])
        await eventually(lambda: worker.consumers[0].counts["handled"] == 1)
        await settle(rabbit, Flaky)

    assert calls == [3, 3, 3]
    assert handled == [3]
    assert rabbit.count(f"{Flaky.queue}.dead") == 0
    assert rabbit.count(f"{Flaky.queue}.retry.100ms") == 0
    assert worker.consumers[0].counts == {"handled": 1, "retried": 2, "parked": 0, "failed": 0}


# -- time-outs ------------------------------------------------------------------------------------


async def test_an_async_handler_past_its_timeout_is_cancelled_retried_then_parked(
    unique, rabbit, run_worker
):
    started: list[float] = []
    cancelled: list[float] = []

    class Slow(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.slow"
        max_attempts = 2
        retry_delays = (0.1,)
        timeout = 0.3

        async def handle(self, message: Item) -> None:
            started.append(time.monotonic())
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(time.monotonic())
                raise

    async with run_worker(Slow):
        await Slow.anotify(n=1)
        properties, body = await parked(rabbit, Slow)

    assert len(started) == 2
    assert len(cancelled) == 2
    assert all(0.25 <= end - start < 5 for start, end in zip(started, cancelled, strict=True))
    headers = headers_of(properties)
    assert headers["x-parked-reason"] == "timeout"
    assert headers["x-exception-type"] == "TimeoutError"
    assert "0.3s" in headers["x-exception-message"]
    assert headers["x-attempts"] == 2
    assert json.loads(body) == {"n": 1}


async def test_a_stuck_sync_handler_times_out_and_the_next_message_is_still_handled(
    unique, rabbit, run_worker, settings
):
    release = threading.Event()
    stuck_calls: list[int] = []
    handled: list[int] = []

    class Stuck(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.stuck"
        max_attempts = 2
        retry_delays = (0.1,)
        timeout = 0.4
        concurrency = 1

        def handle(self, message: Item) -> None:
            if message.n == 1:
                stuck_calls.append(message.n)
                release.wait(30)  # a hung call: only the test lets it go
                return
            handled.append(message.n)

    # Recycling off: this worker carries its stuck threads (see the next test for the default).
    keep = settings.model_copy(update={"max_stuck_threads": 0})
    try:
        async with run_worker(Stuck, worker_settings=keep) as worker:
            await Stuck.anotify(n=1)
            await eventually(lambda: len(stuck_calls) == 1)
            await Stuck.anotify(n=2)
            properties, _body = await parked(rabbit, Stuck)
            await eventually(lambda: handled == [2])
            consumer = worker.consumers[0]
            assert consumer.stuck_threads == 2  # both attempts of message 1 are still running
    finally:
        release.set()

    headers = headers_of(properties)
    assert headers["x-parked-reason"] == "timeout"
    assert headers["x-exception-type"] == "TimeoutError"
    assert headers["x-attempts"] == 2
    assert stuck_calls == [1, 1]
    assert handled == [2]


async def test_a_worker_with_a_stuck_thread_drains_and_stops_to_be_recycled(
    unique, rabbit, settings
):
    release = threading.Event()
    stuck_started = threading.Event()
    handled: list[int] = []

    class Stuck(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.recycled"
        max_attempts = 2
        retry_delays = (30,)  # the retry waits in its delay queue while the worker stops
        timeout = 1.0
        concurrency = 2

        def handle(self, message: Item) -> None:
            if message.n == 1:
                stuck_started.set()
                release.wait(30)
                return
            time.sleep(0.6)  # in flight when the recycle begins: it must finish first
            handled.append(message.n)

    rabbit.track(Stuck)
    worker = Worker([Stuck], settings, install_signals=False)
    run = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: worker.ready)
        await Stuck.anotify(n=1)
        await eventually(stuck_started.is_set)
        await asyncio.sleep(0.7)  # message 2 then runs from 0.7 s to 1.3 s: across the time-out
        await Stuck.anotify(n=2)
        code = await asyncio.wait_for(run, 15)
    finally:
        release.set()

    assert code == EXIT_RECYCLE
    assert handled == [2]  # the other in-flight message finished before the exit
    # The stuck message was retried (it waits in its delay queue), not lost, not parked.
    properties, _body = rabbit.wait_message(f"{Stuck.queue}.retry.30s", timeout=5)
    assert headers_of(properties)["x-attempts"] == 1
    assert rabbit.count(f"{Stuck.queue}.dead") == 0


# -- bad input ------------------------------------------------------------------------------------


BAD_INPUTS = [
    pytest.param(b'{"n": 1', {}, "decode_error", id="truncated-json"),
    pytest.param(b"\xff\xfe", {}, "decode_error", id="not-utf8"),
    pytest.param(b'{"n": "seven"}', {}, "validation_error", id="fails-the-model"),
    pytest.param(b"[1, 2]", {}, "validation_error", id="json-of-the-wrong-shape"),
    pytest.param(
        b'{"n": 1}', {"content_type": "text/plain"}, "unsupported_content_type", id="text"
    ),
    pytest.param(
        b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01n\x94K\x01s.",
        {"content_type": "application/x-python-pickle"},
        "unsupported_content_type",
        id="pickle",
    ),
    pytest.param(
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00",
        {"content_type": "application/json", "content_encoding": "gzip"},
        "unsupported_content_type",
        id="gzip",
    ),
]


@pytest.mark.parametrize(("body", "properties", "reason"), BAD_INPUTS)
async def test_a_message_that_cannot_be_decoded_is_parked_at_once_and_the_worker_goes_on(
    unique, rabbit, run_worker, body, properties, reason
):
    seen: list[int] = []

    class Picky(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.picky"
        max_attempts = 5
        retry_delays = (0.1,)

        async def handle(self, message: Item) -> None:
            seen.append(message.n)

    async with run_worker(Picky) as worker:
        rabbit.publish(unique, "key", body, message_id="bad-1", **properties)
        parked_properties, parked_body = await parked(rabbit, Picky)
        await Picky.anotify(n=42)
        await eventually(lambda: seen == [42])
        await eventually(lambda: worker.consumers[0].counts["handled"] == 1)

    assert parked_body == body
    assert parked_properties.message_id == "bad-1"
    headers = headers_of(parked_properties)
    assert headers["x-parked-reason"] == reason
    assert headers["x-attempts"] == 1
    assert headers["x-exception-type"] == "listener.DecodeFailure"
    assert headers["x-exception-message"].startswith(reason)
    assert seen == [42]  # the bad message never reached handle()
    assert rabbit.count(f"{Picky.queue}.retry.100ms") == 0
    assert rabbit.count(f"{Picky.queue}.dead") == 0


async def test_a_validation_error_names_the_field_but_not_the_value(unique, rabbit, run_worker):
    class Strict(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.strict"

        async def handle(self, message: Item) -> None:
            raise AssertionError("never called")

    async with run_worker(Strict):
        rabbit.publish(unique, "key", b'{"n": "hunter2-secret"}')
        properties, _body = await parked(rabbit, Strict)

    message = headers_of(properties)["x-exception-message"]
    assert "n:" in message
    assert "hunter2-secret" not in message


async def test_a_message_without_a_message_id_gets_one_when_parked(unique, rabbit, run_worker):
    class NoId(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.no_id"

        async def handle(self, message: Item) -> None:
            raise AssertionError("never called")

    async with run_worker(NoId):
        rabbit.publish(unique, "key", b"not json at all")
        properties, body = await parked(rabbit, NoId)

    assert body == b"not json at all"
    assert isinstance(properties.message_id, str)
    assert len(properties.message_id) == 32
    int(properties.message_id, 16)


async def test_a_plain_json_body_with_no_properties_at_all_is_handled(unique, rabbit, run_worker):
    seen: list[Item] = []

    class Plain(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.plain"

        def handle(self, message: Item) -> None:
            seen.append(message)

    async with run_worker(Plain):
        rabbit.publish(unique, "key", b'{"n": 5}')
        await eventually(lambda: len(seen) == 1)
        await settle(rabbit, Plain)

    assert seen == [Item(n=5)]
    assert rabbit.count(f"{Plain.queue}.dead") == 0


async def test_a_listener_without_an_annotation_gets_the_decoded_json_value(
    unique, rabbit, run_worker
):
    seen: list[Any] = []

    class Loose(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.loose"

        async def handle(self, message) -> None:  # type: ignore[no-untyped-def]
            seen.append(message)

    async with run_worker(Loose):
        rabbit.publish(unique, "key", b'{"a": [1, 2, {"b": null}]}')
        await eventually(lambda: len(seen) == 1)

    assert seen == [{"a": [1, 2, {"b": None}]}]


# -- Retry and Reject -----------------------------------------------------------------------------


async def test_retry_with_a_delay_outside_retry_delays_waits_exactly_that_long(
    unique, rabbit, run_worker
):
    calls: list[float] = []

    class Later(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.later"
        max_attempts = 3
        retry_delays = (5,)

        async def handle(self, message: Item) -> None:
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise listener.Retry(delay=0.3)

    async with run_worker(Later) as worker:
        await Later.anotify(n=1)
        await eventually(lambda: len(calls) == 2)
        await eventually(lambda: worker.consumers[0].counts["handled"] == 1)

    # Through the delay levels (0.3 s is 3 steps of 0.125 s), not the listener's 5 s queue
    # nor a rounded tier: never early, and late by less than a second.
    assert 0.3 <= calls[1] - calls[0] < 1.3
    assert not rabbit.exists(f"{Later.queue}.retry.500ms")
    assert rabbit.count(f"{Later.queue}.dead") == 0
    assert rabbit.count(f"{Later.queue}.retry.5s") == 0


async def test_retry_counts_as_an_attempt_and_parks_after_max_attempts(unique, rabbit, run_worker):
    calls: list[int] = []

    class Again(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.again"
        max_attempts = 3

        def handle(self, message: Item) -> None:
            calls.append(message.n)
            raise listener.Retry(delay=0.05, reason="not yet")

    rabbit.queues.add(f"{Again.queue}.retry.100ms")  # 0.05 s rounds up to the 0.1 s step
    async with run_worker(Again):
        await Again.anotify(n=9)
        properties, body = await parked(rabbit, Again)

    assert calls == [9, 9, 9]
    headers = headers_of(properties)
    assert headers["x-parked-reason"] == "failed"
    assert headers["x-exception-type"] == "listener.errors.Retry"
    assert headers["x-exception-message"] == "not yet"
    assert headers["x-attempts"] == 3
    assert json.loads(body) == {"n": 9}


async def test_reject_parks_the_message_at_once_with_its_reason(unique, rabbit, run_worker):
    calls: list[int] = []

    class Refuser(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.refuser"
        max_attempts = 5
        retry_delays = (0.1,)

        async def handle(self, message: Item) -> None:
            calls.append(message.n)
            raise listener.Reject("reason text")

    async with run_worker(Refuser):
        message_id = await Refuser.anotify(n=4)
        properties, body = await parked(rabbit, Refuser)

    assert calls == [4]
    headers = headers_of(properties)
    assert headers["x-parked-reason"] == "rejected"
    assert headers["x-exception-message"] == "reason text"
    assert headers["x-exception-type"] == "listener.errors.Reject"
    assert headers["x-attempts"] == 1
    assert properties.message_id == message_id
    assert json.loads(body) == {"n": 4}
    assert rabbit.count(f"{Refuser.queue}.retry.100ms") == 0


# -- forged headers -------------------------------------------------------------------------------


async def test_forged_attempt_headers_neither_crash_the_worker_nor_lose_the_message(
    unique, rabbit, run_worker
):
    seen: list[int] = []

    class Gullible(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.gullible"
        max_attempts = 3
        retry_delays = (0.1,)

        async def handle(self, message: Job) -> None:
            seen.append(message.n)
            if message.fail:
                raise ValueError(f"job {message.n} failed")

    forged: list[Any] = ["abc", -5, 999, 10**15, True, None, {"n": 1}, [2]]
    async with run_worker(Gullible) as worker:
        for n, value in enumerate(forged, start=1):
            rabbit.publish(
                unique, "key", json.dumps({"n": n}).encode(), headers={"x-attempts": value}
            )
        # An absurd count never loops: the first failure parks the message.
        rabbit.publish(unique, "key", b'{"n": 100, "fail": true}', headers={"x-attempts": 999})
        # A garbage count reads as zero: the failing message gets all its attempts.
        rabbit.publish(unique, "key", b'{"n": 200, "fail": true}', headers={"x-attempts": "abc"})
        first, _ = await parked(rabbit, Gullible)
        second, _ = await parked(rabbit, Gullible)
        await eventually(lambda: worker.consumers[0].counts["handled"] == len(forged))

    assert sorted(n for n in seen if n < 100) == list(range(1, len(forged) + 1))
    assert seen.count(100) == 1
    assert seen.count(200) == 3
    parked_headers = sorted(
        (headers_of(first), headers_of(second)), key=lambda h: h["x-exception-message"]
    )
    assert [h["x-exception-message"] for h in parked_headers] == [
        "job 100 failed",
        "job 200 failed",
    ]
    assert all(h["x-parked-reason"] == "failed" for h in parked_headers)
    assert parked_headers[0]["x-attempts"] >= Gullible.max_attempts
    assert parked_headers[1]["x-attempts"] == 3
    assert rabbit.count(Gullible.queue) == 0
    assert rabbit.count(f"{Gullible.queue}.dead") == 0


async def test_a_delivery_count_at_the_delivery_limit_parks_the_message_unrun_and_never_as_a_death(
    unique, rabbit, run_worker
):
    seen: list[int] = []

    class Trusting(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.trusting"
        max_attempts = 3

        async def handle(self, message: Item) -> None:
            seen.append(message.n)

    assert Trusting.delivery_limit() == 9
    async with run_worker(Trusting) as worker:
        # RabbitMQ 3.10 keeps a publisher's own x-delivery-count on a quorum queue.
        rabbit.publish(unique, "key", b'{"n": 1}', headers={"x-delivery-count": 9})
        rabbit.publish(unique, "key", b'{"n": 2}', headers={"x-delivery-count": "zz"})
        rabbit.publish(unique, "key", b'{"n": 3}', headers={"x-delivery-count": 8})
        properties, body = await parked(rabbit, Trusting)
        await eventually(lambda: worker.consumers[0].counts["handled"] == 2)

    # A garbage count reads as zero, a count below the limit is no death; at the limit the
    # message never ran.
    assert sorted(seen) == [2, 3]
    assert body == b'{"n": 1}'
    headers = headers_of(properties)
    assert headers["x-parked-reason"] == "delivery_limit"
    assert headers["x-exception-type"] == "listener.DeliveryLimit"
    assert "max_deliveries=9" in headers["x-exception-message"]
    assert headers["x-attempts"] == 1


# -- topology -------------------------------------------------------------------------------------


async def test_a_queue_that_exists_with_other_arguments_stops_the_worker_with_topology_mismatch(
    unique, rabbit, run_worker
):
    class Drifted(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.drifted"

        async def handle(self, message: Item) -> None: ...

    rabbit.track(Drifted)
    rabbit.declare_queue(Drifted.queue)  # classic, no dead-lettering: not what Drifted needs

    with pytest.raises(listener.TopologyMismatch) as caught:
        async with run_worker(Drifted):
            pass

    text = str(caught.value)
    assert repr(Drifted.queue) in text
    assert "x-queue-type" in text or "x-dead-letter" in text
    assert rabbit.exists(Drifted.queue)  # left as it was, for the operator to decide


async def test_two_listeners_on_one_key_each_get_every_message(unique, rabbit, run_worker):
    got: dict[str, list[int]] = {"audit": [], "mailer": []}

    class Audit(Listener):
        subscribes_to = f"{unique}.order.created"
        queue = f"{unique}.audit"

        async def handle(self, message: Item) -> None:
            got["audit"].append(message.n)

    class Mailer(Listener):
        subscribes_to = f"{unique}.order.created"
        queue = f"{unique}.mailer"

        def handle(self, message: Item) -> None:
            got["mailer"].append(message.n)

    async with run_worker(Audit, Mailer):
        ids = await Audit.anotify_many([Item(n=n) for n in range(5)])
        await eventually(lambda: len(got["audit"]) == 5 and len(got["mailer"]) == 5)

    assert len(set(ids)) == 5
    assert sorted(got["audit"]) == list(range(5))
    assert sorted(got["mailer"]) == list(range(5))


async def test_a_hash_wildcard_binding_receives_keys_of_one_and_more_words(
    unique, rabbit, run_worker
):
    seen: list[int] = []

    class Everything(Listener):
        subscribes_to = f"{unique}.a.#"
        queue = f"{unique}.everything"

        async def handle(self, message: Item) -> None:
            seen.append(message.n)

    async with run_worker(Everything):
        rabbit.publish(unique, "b", b'{"n": 0}')  # does not match a.#
        await Everything.anotify(n=1, routing_key="a")
        await Everything.anotify(n=2, routing_key="a.b")
        await Everything.anotify(n=3, routing_key="a.b.c")
        await eventually(lambda: len(seen) == 3)

    assert sorted(seen) == [1, 2, 3]
    with pytest.raises(ValueError, match="does not match"):
        await Everything.anotify(n=4, routing_key="b")
    with pytest.raises(ValueError, match="concrete routing_key"):
        await Everything.anotify(n=5)


# -- acks and stopping ----------------------------------------------------------------------------


async def test_a_message_is_acked_only_after_handle_returns(unique, rabbit, run_worker, settings):
    entered = asyncio.Event()
    release = asyncio.Event()
    finished: list[int] = []

    class Careful(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.careful"

        async def handle(self, message: Item) -> None:
            entered.set()
            await release.wait()
            finished.append(message.n)

    quick = settings.model_copy(update={"grace_period": 0.3})
    async with run_worker(Careful, worker_settings=quick) as worker:
        await Careful.anotify(n=1)
        await asyncio.wait_for(entered.wait(), 10)
        assert rabbit.count(Careful.queue) == 0  # delivered, held unacked by the worker
        worker.request_stop("test: stop while handle() still runs")
    # Not acked, because handle() never returned: the broker has it back.
    await eventually(lambda: rabbit.count(Careful.queue) == 1)
    assert finished == []

    release.set()
    async with run_worker(Careful) as worker:
        await eventually(lambda: finished == [1])
        await eventually(lambda: worker.consumers[0].counts["handled"] == 1)
        await settle(rabbit, Careful)
    assert rabbit.count(f"{Careful.queue}.dead") == 0


async def test_stopping_mid_handle_past_the_grace_period_hands_the_message_back_unfailed(
    unique, rabbit, run_worker, settings
):
    entered = asyncio.Event()
    cancelled: list[int] = []

    class Interrupted(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.interrupted"
        max_attempts = 2
        retry_delays = (0.1,)

        async def handle(self, message: Item) -> None:
            entered.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(message.n)
                raise

    quick = settings.model_copy(update={"grace_period": 0.3})
    started = time.monotonic()
    async with run_worker(Interrupted, worker_settings=quick) as worker:
        message_id = await Interrupted.anotify(n=8)
        await asyncio.wait_for(entered.wait(), 10)
        worker.request_stop("test: deploy")
    stopped_after = time.monotonic() - started

    assert cancelled == [8]
    assert stopped_after < 10
    assert worker.consumers[0].counts == {"handled": 0, "retried": 0, "parked": 0, "failed": 0}
    properties, body = await asyncio.to_thread(rabbit.wait_message, Interrupted.queue, 5)
    assert properties.message_id == message_id
    assert json.loads(body) == {"n": 8}
    assert "x-attempts" not in headers_of(properties)
    assert "x-exception-type" not in headers_of(properties)
    assert rabbit.count(f"{Interrupted.queue}.dead") == 0
    assert rabbit.count(f"{Interrupted.queue}.retry.100ms") == 0


async def test_a_message_handed_back_by_a_stop_is_handled_by_the_next_worker(
    unique, rabbit, run_worker, settings
):
    entered = asyncio.Event()
    handled: list[int] = []

    class Resumed(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.resumed"
        max_attempts = 2
        retry_delays = (0.1,)

        async def handle(self, message: Item) -> None:
            if not entered.is_set():
                entered.set()
                await asyncio.sleep(30)
            handled.append(message.n)

    quick = settings.model_copy(update={"grace_period": 0.2})
    async with run_worker(Resumed, worker_settings=quick) as worker:
        await Resumed.anotify(n=5)
        await asyncio.wait_for(entered.wait(), 10)
        worker.request_stop("test: deploy")
    await eventually(lambda: rabbit.count(Resumed.queue) == 1)

    async with run_worker(Resumed) as worker:
        await eventually(lambda: handled == [5])
        await eventually(lambda: worker.consumers[0].counts["handled"] == 1)
    assert rabbit.count(f"{Resumed.queue}.dead") == 0


async def test_a_stop_past_the_grace_period_does_not_use_up_an_attempt(
    unique, rabbit, run_worker, settings
):
    entered = asyncio.Event()
    handled: list[int] = []

    class OneShot(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.one_shot"
        max_attempts = 1

        async def handle(self, message: Item) -> None:
            if not entered.is_set():
                entered.set()
                await asyncio.sleep(30)  # interrupted by a deploy, through no fault of its own
            handled.append(message.n)

    quick = settings.model_copy(update={"grace_period": 0.2})
    async with run_worker(OneShot, worker_settings=quick) as worker:
        await OneShot.anotify(n=6)
        await asyncio.wait_for(entered.wait(), 10)
        worker.request_stop("test: deploy")
    await eventually(lambda: rabbit.count(OneShot.queue) == 1)

    async with run_worker(OneShot) as worker:
        await eventually(lambda: sum(worker.consumers[0].counts.values()) == 1)

    dead = rabbit.drain(f"{OneShot.queue}.dead")
    assert dead == [], f"parked instead of handled: {headers_of(dead[0][0])}"
    assert handled == [6]


# -- how handle() is declared ---------------------------------------------------------------------


def _plain_decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator that knows nothing of async, as logging and metrics helpers often are."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


async def test_an_async_handle_behind_a_plain_wrapping_decorator_is_awaited_and_acked(
    unique, rabbit, run_worker
):
    seen: list[int] = []

    class Decorated(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.decorated"

        @_plain_decorator
        async def handle(self, message: Item) -> None:
            await asyncio.sleep(0)
            seen.append(message.n)

    assert Decorated.is_async
    async with run_worker(Decorated) as worker:
        await Decorated.anotify(n=1)
        await eventually(lambda: worker.consumers[0].counts["handled"] == 1)
        await settle(rabbit, Decorated)

    assert seen == [1]  # the body ran: the coroutine was awaited, not dropped
    assert worker.consumers[0].counts == {"handled": 1, "retried": 0, "parked": 0, "failed": 0}
    assert rabbit.count(f"{Decorated.queue}.dead") == 0


async def test_a_sync_handle_that_returns_a_coroutine_fails_and_is_parked_not_acked(
    unique, rabbit, run_worker
):
    ran: list[int] = []

    class HiddenAsync(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.hidden_async"
        max_attempts = 2
        retry_delays = (0.1,)

        # What a decorator without functools.wraps leaves behind: a plain function that
        # returns the coroutine of the real, async, handler.
        def handle(self, message: Item) -> Any:
            return self._really(message)

        async def _really(self, message: Item) -> None:
            ran.append(message.n)

    assert not HiddenAsync.is_async
    async with run_worker(HiddenAsync) as worker:
        await HiddenAsync.anotify(n=3)
        properties, body = await parked(rabbit, HiddenAsync)
        await settle(rabbit, HiddenAsync)

    headers = headers_of(properties)
    assert headers["x-parked-reason"] == "failed"
    assert headers["x-attempts"] == 2
    assert headers["x-exception-type"] == "TypeError"
    assert "awaitable" in headers["x-exception-message"]
    assert json.loads(body) == {"n": 3}
    assert ran == []  # the coroutine was closed, never run half-way
    assert worker.consumers[0].counts["handled"] == 0


def test_a_handle_declared_with_yield_is_refused_when_the_class_is_created(unique):
    with pytest.raises(listener.ListenerDefinitionError, match="handle"):

        class SyncGenerator(Listener):
            subscribes_to = f"{unique}.key"
            queue = f"{unique}.sync_generator"

            def handle(self, message: Item) -> Any:
                yield message

    with pytest.raises(listener.ListenerDefinitionError, match="handle"):

        class AsyncGenerator(Listener):
            subscribes_to = f"{unique}.key"
            queue = f"{unique}.async_generator"

            async def handle(self, message: Item) -> Any:
                yield message

    with pytest.raises(listener.ListenerDefinitionError, match="handle"):

        class DecoratedGenerator(Listener):
            subscribes_to = f"{unique}.key"
            queue = f"{unique}.decorated_generator"

            @_plain_decorator
            def handle(self, message: Item) -> Any:
                yield message


# -- connection blips -----------------------------------------------------------------------------


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    """A TCP proxy to the broker, for a worker whose connection the test breaks."""
    running = TcpProxy()
    running.start()
    try:
        yield running
    finally:
        running.stop()


def through(proxy: TcpProxy, **overrides: Any) -> Settings:
    """Worker settings that connect through `proxy`."""
    values: dict[str, Any] = {"grace_period": 5, "confirm_timeout": 5, "connect_attempts": 1}
    values.update(overrides)
    return Settings(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F", **values)


async def test_a_connection_reset_during_a_sync_handler_does_not_wedge_the_listener(
    unique, rabbit, run_worker, proxy
):
    first_started = threading.Event()
    release_first = threading.Event()
    finished: list[int] = []

    class Blipped(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.blipped"
        concurrency = 1
        timeout = 8
        retry_delays = (0.1,)

        def handle(self, message: Item) -> None:
            if not first_started.is_set():
                first_started.set()
                release_first.wait(8)  # still running while the connection is replaced
            finished.append(message.n)

    try:
        async with run_worker(Blipped, worker_settings=through(proxy)) as worker:
            before = worker._transport
            await Blipped.anotify(n=1)
            assert await asyncio.to_thread(first_started.wait, 5)
            proxy.reset()  # a broker blip while the sync handler runs
            await eventually(lambda: worker._transport is not before and worker.ready)
            # Message 1 comes back (never acked); it and the next one are handled although
            # the first attempt's thread is still busy.
            await eventually(lambda: finished == [1])
            await Blipped.anotify(n=2)
            await eventually(lambda: finished == [1, 2])
            release_first.set()
            await eventually(lambda: finished == [1, 2, 1])  # the abandoned call returns late
            await settle(rabbit, Blipped)
    finally:
        release_first.set()

    assert rabbit.count(Blipped.queue) == 0
    assert rabbit.count(f"{Blipped.queue}.dead") == 0


async def test_a_stop_with_the_connection_blackholed_returns_within_the_grace_period(
    unique, rabbit, run_worker, proxy
):
    class Cut(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.cut"

        async def handle(self, message: Item) -> None: ...

    # A heartbeat longer than the test: only the drain's own bounds can end the wait.
    quick = through(proxy, grace_period=1, heartbeat=60)
    async with run_worker(Cut, worker_settings=quick):
        proxy.blackhole()  # the broker stops answering; the socket stays open
        stopping = time.monotonic()
    took = time.monotonic() - stopping

    assert took < 10, f"run() returned {took:.1f}s after the stop request (grace 1s)"


# -- Retry with odd delays ------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [10**10, float("inf"), float("nan"), -1])
def test_a_retry_delay_the_broker_cannot_hold_is_refused_when_the_retry_is_made(delay):
    with pytest.raises(ValueError, match="Retry delay"):
        listener.Retry(delay=delay)


def test_the_longest_retry_delay_the_broker_can_hold_is_accepted():
    assert listener.Retry(delay=4_294_967).delay == 4_294_967
    assert listener.Retry(delay=0).delay == 0


@pytest.mark.parametrize("delay", [float("inf"), float("nan")], ids=["inf", "nan"])
async def test_retry_with_a_non_finite_delay_is_an_ordinary_failure_and_the_worker_goes_on(
    unique, rabbit, run_worker, delay
):
    handled: list[int] = []

    class Unbounded(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.unbounded"
        concurrency = 1
        max_attempts = 2
        retry_delays = (0.1,)

        async def handle(self, message: Item) -> None:
            if message.n == 1:
                raise listener.Retry(delay=delay)
            handled.append(message.n)

    async with run_worker(Unbounded) as worker:
        await Unbounded.anotify(n=1)
        properties, _body = await parked(rabbit, Unbounded)
        await Unbounded.anotify(n=2)
        await eventually(lambda: handled == [2])
        await eventually(lambda: worker.consumers[0].counts["handled"] == 1)

    headers = headers_of(properties)
    assert headers["x-parked-reason"] == "failed"
    assert headers["x-exception-type"] == "ValueError"
    assert "Retry delay" in headers["x-exception-message"]
    assert headers["x-attempts"] == 2  # retried on the listener's own delays, then parked
    assert worker.consumers[0].counts["parked"] == 1


async def test_a_retry_delay_outside_retry_delays_waits_in_the_delay_levels_not_a_rounded_tier(
    unique, rabbit, run_worker
):
    calls: list[int] = []

    class Exact(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.exact"
        max_attempts = 3
        retry_delays = (1,)

        async def handle(self, message: Item) -> None:
            calls.append(message.n)
            raise listener.Retry(delay=7)

    # 7 s is 56 steps of 0.125 s, binary 111000: 4 s in level 5, then 2 s and 1 s.
    four_seconds = delay.level_name(5)
    mine = delay.target_key(Exact.queue)

    def waiting() -> list[Any]:
        # The levels are shared: take every message there, and keep this listener's.
        return [p for p, _ in rabbit.drain(four_seconds) if mine in (p.headers or {}).get("CC", [])]

    async with run_worker(Exact) as worker:
        await Exact.anotify(n=1)
        await eventually(lambda: worker.consumers[0].counts["retried"] == 1)
        found: list[Any] = []
        await eventually(lambda: bool(found.extend(waiting()) or found))

    assert calls == [1]  # waiting its 7 s, never sooner
    assert not rabbit.exists(f"{Exact.queue}.retry.10s")
    assert rabbit.count(f"{Exact.queue}.retry.1s") == 0
    assert rabbit.count(Exact.queue) == 0
    (properties,) = found
    headers = headers_of(properties)
    assert headers["x-attempts"] == 1
    assert headers["CC"] == [".".join(["d", *"0" * 20, *"111000"]), mine]


# -- failures that are awkward to describe --------------------------------------------------------


class Card(BaseModel):
    number: int


#: A stored record that fails validation; its value must never reach a parked message's headers.
CARD_ON_FILE = {"number": "SECRET-4111-1111"}


async def test_a_validation_error_raised_from_inside_handle_keeps_the_input_out_of_the_headers(
    unique, rabbit, run_worker
):
    class Payments(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.payments"
        max_attempts = 1

        async def handle(self, message: Item) -> None:
            try:
                Card.model_validate(CARD_ON_FILE)
            except pydantic.ValidationError as exc:
                raise ValueError("the card on file is unusable") from exc

    async with run_worker(Payments):
        await Payments.anotify(n=1)
        properties, _body = await parked(rabbit, Payments)

    headers = headers_of(properties)
    assert headers["x-exception-type"] == "ValueError"
    assert headers["x-exception-message"] == "the card on file is unusable"
    text = headers["x-exception-traceback"]
    assert "ValidationError" in text  # the cause is still told...
    assert "number" in text  # ...by the field it concerns...
    assert "SECRET-4111" not in text  # ...never by the value
    assert "SECRET-4111" not in headers["x-exception-message"]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


async def test_an_exception_whose_str_raises_is_still_parked_and_the_worker_goes_on(
    unique, rabbit, run_worker
):
    handled: list[int] = []

    class Awkward(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.awkward"
        concurrency = 1
        max_attempts = 1

        def handle(self, message: Item) -> None:
            if message.n == 1:
                raise Unprintable()
            handled.append(message.n)

    async with run_worker(Awkward) as worker:
        await Awkward.anotify(n=1)
        properties, body = await parked(rabbit, Awkward)
        await Awkward.anotify(n=2)
        await eventually(lambda: handled == [2])
        await eventually(lambda: worker.consumers[0].counts["handled"] == 1)

    headers = headers_of(properties)
    assert headers["x-parked-reason"] == "failed"
    assert "Unprintable" in headers["x-exception-type"]
    assert "str() failed" in headers["x-exception-message"]
    assert "raise Unprintable()" in headers["x-exception-traceback"]
    assert json.loads(body) == {"n": 1}
    assert rabbit.count(Awkward.queue) == 0
