"""Delayed messages survive a broker killed with kill -9 and restarted (project-owned node)."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel

from faults.node import RabbitNode
from listener import Listener, Settings
from listener.publisher import Publisher
from listener.runner.worker import Worker

pytestmark = pytest.mark.slow


class Due(BaseModel):
    n: int
    due: float


async def _handled_by_worker(
    cls: type[Listener], settings: Settings, seen: dict[int, float], count: int, timeout: float
) -> None:
    worker = Worker([cls], settings, install_signals=False)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < count and time.monotonic() < deadline:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
    finally:
        worker.request_stop("test finished")
        await asyncio.wait_for(task, timeout=30)


def test_delayed_messages_wait_out_a_broker_killed_minus_9_and_arrive_never_early(
    node: RabbitNode, unique: str
) -> None:
    seen: dict[int, float] = {}

    class Patient(Listener):
        subscribes_to = f"{unique}.due"
        queue = f"{unique}.patient"

        async def handle(self, message: Due) -> None:
            seen.setdefault(message.n, time.time() - message.due)

    settings = Settings(url=node.url, grace_period=5, confirm_timeout=10, connect_attempts=5)
    # Declares the topology and finds nothing to handle yet.
    asyncio.run(_handled_by_worker(Patient, settings, seen, 1, timeout=1))

    publisher = Publisher(settings)
    delays = [1 + 0.7 * n for n in range(24)]  # 1 s to 17.1 s: some come due while it is down
    for n, delay in enumerate(delays):
        publisher.publish(f"{unique}.due", {"n": n, "due": time.time() + delay}, delay=delay)
    publisher.close()

    node.kill()
    node.start()
    asyncio.run(_handled_by_worker(Patient, settings, seen, len(delays), timeout=60))

    assert sorted(seen) == list(range(len(delays))), "a delayed message was lost"
    early = {n: lateness for n, lateness in seen.items() if lateness < 0}
    assert early == {}, "a delayed message came before its time"
