"""The worker keeps consuming through what the broker does to it: deleted queues, closed
connections. (Broker restarts and network faults have their own, slower, suite.)"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from listener import Listener


def _close_connections_naming(text: str) -> int | None:
    """Have the broker close (CONNECTION_FORCED) every connection whose name holds `text`."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if listed.returncode != 0:
        return None
    pids = [line.split("\t")[0] for line in listed.stdout.splitlines() if text in line]
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


async def test_a_connection_closed_by_the_broker_is_reopened_and_consuming_resumes(
    unique, rabbit, run_worker
):
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
        closed = await asyncio.to_thread(_close_connections_naming, Reconnecting.queue)
        if closed is None:
            pytest.skip("rabbitmqctl is not usable here")
        assert closed == 1
        await _wait_until(
            lambda: worker._transport is not before and worker.ready, "the worker to reconnect"
        )
        await Reconnecting.anotify({"n": 2})
        await _wait_until(lambda: seen == [2], "the message to be handled after reconnecting")
