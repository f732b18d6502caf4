"""Every row of the outcome table, on the in-memory broker and on RabbitMQ: the same
outcomes, and parked messages with the same headers (names and types, key by key)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from typing import Any

import pytest
from conformance_harness import Harness, MemoryHarness, Parked, RabbitHarness
from pydantic import BaseModel

from listener import Listener, Reject, Retry


class Job(BaseModel):
    n: int


#: The parked copy's headers and their types, by park reason: both brokers must match.
FAILURE = {
    "x-parked-reason": str,
    "x-attempts": int,
    "x-exception-type": str,
    "x-exception-message": str,
    "x-listener": str,
    "x-host": str,
    "x-pid": int,
    "x-first-failure-at": str,
    "x-last-failure-at": str,
    "x-original-exchange": str,
    "x-original-routing-key": str,
}
WITH_TRACEBACK = {**FAILURE, "x-exception-traceback": str}


def shape(headers: dict[str, Any]) -> dict[str, type]:
    return {name: type(value) for name, value in headers.items()}


def policy(unique: str, name: str, **attributes: Any) -> dict[str, Any]:
    """Class attributes for a fast listener with unique names."""
    return {
        "subscribes_to": f"{unique}.job",
        "queue": f"{unique}.{name}",
        "max_attempts": 3,
        "retry_delays": (0.2,),
        "timeout": 5,
        **attributes,
    }


def only(parked: list[Parked]) -> Parked:
    assert len(parked) == 1, parked
    return parked[0]


# -- handle raises --------------------------------------------------------------------------------


async def test_a_handler_that_raises_is_retried_then_parked_with_its_story(broker, unique):
    calls: list[int] = []

    def handle(self: Any, message: Job) -> None:
        calls.append(message.n)
        raise ValueError(f"job {message.n} broke")

    failing = type("Failing", (Listener,), {**policy(unique, "failing"), "handle": handle})

    async with broker.running(failing):
        message_id = await failing.anotify(n=4)
        await broker.until(lambda: len(broker.parked(failing)) == 1, "parked")

    parked = only(broker.parked(failing))
    assert calls == [4, 4, 4]
    assert shape(parked.headers) == WITH_TRACEBACK
    headers = parked.headers
    assert headers["x-parked-reason"] == "failed"
    assert headers["x-attempts"] == 3
    assert headers["x-exception-type"] == "ValueError"
    assert headers["x-exception-message"] == "job 4 broke"
    assert headers["x-listener"] == failing.name()
    assert (headers["x-host"], headers["x-pid"]) == (socket.gethostname(), os.getpid())
    assert headers["x-original-exchange"] == unique
    assert headers["x-original-routing-key"] == "job"
    assert headers["x-first-failure-at"] < headers["x-last-failure-at"]
    assert parked.message_id == message_id
    assert json.loads(parked.body) == {"n": 4}


async def test_a_handler_that_fails_once_is_retried_and_handled(broker, unique):
    calls: list[int] = []

    async def handle(self: Any, message: Job) -> None:
        calls.append(message.n)
        if len(calls) == 1:
            raise ConnectionError("flaky")

    flaky = type("Flaky", (Listener,), {**policy(unique, "flaky"), "handle": handle})

    async with broker.running(flaky):
        await flaky.anotify(n=1)
        await broker.until(lambda: len(calls) == 2, "handled on the second attempt")

    assert broker.parked(flaky) == []


# -- handle returns -------------------------------------------------------------------------------


async def test_a_handler_that_returns_has_its_message_handled_once(broker, unique):
    seen: list[Job] = []

    def handle(self: Any, message: Job) -> None:
        seen.append(message)

    fine = type("Fine", (Listener,), {**policy(unique, "fine"), "handle": handle})

    async with broker.running(fine):
        await fine.anotify(n=1)
        fine.notify(Job(n=2))
        await broker.until(lambda: sorted(m.n for m in seen) == [1, 2], "both handled")

    assert all(isinstance(m, Job) for m in seen)
    assert broker.parked(fine) == []


# -- Retry and Reject -----------------------------------------------------------------------------


async def test_retry_with_a_delay_is_handled_again_after_it(broker, unique):
    times: list[float] = []

    def handle(self: Any, message: Job) -> None:
        times.append(time.monotonic())
        if len(times) == 1:
            raise Retry(delay=0.2)

    later = type("Later", (Listener,), {**policy(unique, "later"), "handle": handle})

    async with broker.running(later):
        await later.anotify(n=1)
        await broker.until(lambda: len(times) == 2, "handled again")

    assert broker.parked(later) == []
    if broker.kind == "rabbitmq":  # the memory kit waits on its virtual clock instead
        assert times[1] - times[0] >= 0.2


async def test_reject_parks_at_once_with_its_reason(broker, unique):
    calls: list[int] = []

    async def handle(self: Any, message: Job) -> None:
        calls.append(message.n)
        raise Reject(f"job {message.n} is not ours")

    refusing = type("Refusing", (Listener,), {**policy(unique, "refusing"), "handle": handle})

    async with broker.running(refusing):
        await refusing.anotify(n=9)
        await broker.until(lambda: len(broker.parked(refusing)) == 1, "parked")

    parked = only(broker.parked(refusing))
    assert calls == [9]
    assert shape(parked.headers) == WITH_TRACEBACK
    assert parked.headers["x-parked-reason"] == "rejected"
    assert parked.headers["x-attempts"] == 1
    assert parked.headers["x-exception-message"] == "job 9 is not ours"
    assert parked.headers["x-exception-type"] == "listener.errors.Reject"


# -- bodies that cannot be decoded ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"{not json", "application/json", "decode_error"),
        (b'{"n": "many"}', None, "validation_error"),
        (b'{"n": 1}', "text/plain", "unsupported_content_type"),
    ],
)
async def test_a_body_that_cannot_be_decoded_is_parked_at_once(
    broker, unique, body, content_type, reason
):
    calls: list[Job] = []

    def handle(self: Any, message: Job) -> None:
        calls.append(message)

    strict = type("Strict", (Listener,), {**policy(unique, "strict"), "handle": handle})

    async with broker.running(strict):
        broker.publish_raw(unique, "job", body, content_type=content_type)
        await broker.until(lambda: len(broker.parked(strict)) == 1, "parked")

    parked = only(broker.parked(strict))
    assert calls == []
    assert shape(parked.headers) == FAILURE
    assert parked.headers["x-parked-reason"] == reason
    assert parked.headers["x-attempts"] == 1
    assert parked.headers["x-exception-type"] == "listener.DecodeFailure"
    assert parked.body == body
    assert len(parked.message_id) == 32  # one was given to a message published without


# -- time-outs ------------------------------------------------------------------------------------


async def test_an_async_handler_past_its_timeout_is_cancelled_and_parked_as_timeout(broker, unique):
    cancelled: list[int] = []

    async def handle(self: Any, message: Job) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(message.n)
            raise

    hanging = type(
        "Hanging",
        (Listener,),
        {**policy(unique, "hanging", timeout=0.3, max_attempts=2), "handle": handle},
    )

    async with broker.running(hanging):
        await hanging.anotify(n=1)
        await broker.until(lambda: len(broker.parked(hanging)) == 1, "parked")

    parked = only(broker.parked(hanging))
    assert cancelled == [1, 1]
    assert shape(parked.headers) == FAILURE
    assert parked.headers["x-parked-reason"] == "timeout"
    assert parked.headers["x-exception-type"] == "TimeoutError"
    assert parked.headers["x-attempts"] == 2


async def test_a_sync_handler_past_its_timeout_is_parked_as_timeout(broker, unique):
    def handle(self: Any, message: Job) -> None:
        time.sleep(0.5)

    stuck = type(
        "Stuck",
        (Listener,),
        {**policy(unique, "stuck", timeout=0.2, max_attempts=1), "handle": handle},
    )

    async with broker.running(stuck):
        await stuck.anotify(n=1)
        await broker.until(lambda: len(broker.parked(stuck)) == 1, "parked")

    parked = only(broker.parked(stuck))
    assert shape(parked.headers) == FAILURE
    assert parked.headers["x-parked-reason"] == "timeout"
    assert parked.headers["x-exception-type"] == "TimeoutError"


# -- the two brokers side by side -----------------------------------------------------------------


async def test_both_brokers_park_a_failing_message_with_equal_headers_key_by_key(
    unique, run_worker, rabbit, settings
):
    def handle(self: Any, message: Job) -> None:
        raise LookupError("not found")

    failing = type(
        "Twin", (Listener,), {**policy(unique, "twin", max_attempts=2), "handle": handle}
    )
    parked: dict[str, Parked] = {}
    harnesses: list[Harness] = [
        MemoryHarness("memory"),
        RabbitHarness(run_worker, rabbit, settings),
    ]
    for harness in harnesses:
        async with harness.running(failing):
            await failing.anotify(n=5)
            await harness.until(lambda h=harness: len(h.parked(failing)) == 1, "parked")
        parked[harness.kind] = only(harness.parked(failing))

    memory, rabbitmq = parked["memory"].headers, parked["rabbitmq"].headers
    assert sorted(memory) == sorted(rabbitmq)
    for name in memory:
        assert type(memory[name]) is type(rabbitmq[name]), name
    varying = {"x-first-failure-at", "x-last-failure-at", "x-exception-traceback"}
    assert {k: v for k, v in memory.items() if k not in varying} == {
        k: v for k, v in rabbitmq.items() if k not in varying
    }
    assert parked["memory"].body == parked["rabbitmq"].body
