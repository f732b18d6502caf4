"""The worker keeps consuming through what the broker does to it: deleted queues, closed
connections. (Broker restarts and network faults have their own, slower, suite.)"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from listener import Listener


def _close_connections_naming(*texts: str, but_not: str | None = None) -> int | None:
    """Have the broker close (CONNECTION_FORCED) every connection whose name holds all of
    `texts` (and not `but_not`)."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if listed.returncode != 0:
        return None
    pids = [
        line.split("\t")[0]
        for line in listed.stdout.splitlines()
        if all(text in line for text in texts) and (but_not is None or but_not not in line)
    ]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "amqp-listener recovery test"],
            capture_output=True,
            timeout=60,
            check=True,
        )
    return len(pids)


async def _wait_until(check, what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_queue_deleted_under_the_worker_is_declared_again_and_consumed(
    unique, rabbit, run_worker
):
    seen: list[int] = []

    class Resilient(Listener):
        subscribes_to = f"{unique}.item"
        queue = f"{unique}.resilient"

        async def handle(self, message: dict[str, int]) -> None:
            seen.append(message["n"])

    async with run_worker(Resilient):
        rabbit.delete_queue(Resilient.queue)
        # The broker cancels the consumer; the worker must not sit on a live connection
        # that consumes nothing.
        await _wait_until(lambda: rabbit.consumers(Resilient.queue) == 1, "a new consumer")
        await Resilient.anotify({"n": 1})
        await _wait_until(lambda: seen == [1], "the message to be handled")


@pytest.mark.parametrize(
    ("which", "but_not", "expected"),
    [("(deliveries)", None, 1), ("worker", "(deliveries)", 1), ("worker", None, 2)],
    ids=["the-deliveries-connection", "the-moves-connection", "both"],
)
async def test_a_connection_closed_by_the_broker_is_reopened_and_consuming_resumes(
    unique, rabbit, run_worker, which, but_not, expected
):
    # A worker holds two connections, one for deliveries and one for declares and moves:
    # losing either one is losing the broker.
    seen: list[int] = []

    class Reconnecting(Listener):
        subscribes_to = f"{unique}.item"
        queue = f"{unique}.reconnecting"

        async def handle(self, message: dict[str, int]) -> None:
            seen.append(message["n"])

    async with run_worker(Reconnecting) as worker:
        before = worker._transport
        # Close this worker's connection only (it is named after its queue): other suites
        # may be using the same broker.
        closed = await asyncio.to_thread(
            _close_connections_naming, Reconnecting.queue, which, but_not=but_not
        )
        if closed is None:
            pytest.skip("rabbitmqctl is not usable here")
        assert closed == expected
        await _wait_until(
            lambda: worker._transport is not before and worker.ready, "the worker to reconnect"
        )
        await Reconnecting.anotify({"n": 2})
        await _wait_until(lambda: seen == [2], "the message to be handled after reconnecting")


async def test_deleting_one_listeners_queue_leaves_the_other_listeners_handler_running(
    unique, rabbit, run_worker
):
    busy_started = asyncio.Event()
    busy_events: list[str] = []
    other_seen: list[int] = []

    class Busy(Listener):
        subscribes_to = f"{unique}.busy"
        queue = f"{unique}.busy"

        async def handle(self, message: dict[str, int]) -> None:
            busy_events.append("started")
            busy_started.set()
            try:
                await asyncio.sleep(1.5)
            except asyncio.CancelledError:
                busy_events.append("cancelled")
                raise
            busy_events.append("finished")

    class Other(Listener):
        subscribes_to = f"{unique}.other"
        queue = f"{unique}.other"

        async def handle(self, message: dict[str, int]) -> None:
            other_seen.append(message["n"])

    async with run_worker(Busy, Other) as worker:
        connection = worker._transport
        await Busy.anotify({"n": 1})
        await asyncio.wait_for(busy_started.wait(), 10)
        rabbit.delete_queue(Other.queue)  # the broker cancels Other's consumer only

        await _wait_until(lambda: "finished" in busy_events, "Busy's handler to finish")
        await _wait_until(lambda: rabbit.consumers(Other.queue) == 1, "Other to consume again")
        await Other.anotify({"n": 2})
        await _wait_until(lambda: other_seen == [2], "Other's message to be handled")
        busy = next(c for c in worker.consumers if c.listener is Busy)
        await _wait_until(lambda: busy.counts["handled"] == 1, "Busy's message to be acked")
        assert worker._transport is connection  # one listener's trouble is not everyone's

    assert busy_events == ["started", "finished"]  # never cancelled, never redelivered
    assert rabbit.count(Busy.queue) == 0
    assert rabbit.count(f"{Busy.queue}.dead") == 0
