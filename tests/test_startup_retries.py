"""Start-up retries while the broker is out of reach: the ladder a lone worker and the
supervisor's check share (`listener.runner.startup.StartRetries`).

The supervisor's side runs as a real process in tests/test_cli.py; here the ladder itself,
and a `Worker` started in this process against a port where nothing listens.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from pydantic import BaseModel
from support.waiting import eventually

from listener import BrokerUnreachable, Listener, Settings
from listener.runner import Worker
from listener.runner.startup import DELAY_CAP, FIRST_DELAY, StartRetries

UNREACHABLE_URL = "amqp://guest:guest@127.0.0.1:1/%2F"


class Item(BaseModel):
    n: int


def unreachable(attempts: int) -> Settings:
    return Settings(url=UNREACHABLE_URL, connect_attempts=attempts, connect_timeout=2)


def refused() -> BrokerUnreachable:
    return BrokerUnreachable("cannot connect to amqp://guest:***@127.0.0.1:1/")


def test_fail_fast_gives_up_after_the_first_failure_without_a_retry_line(caplog):
    retries = StartRetries(unreachable(5), fail_fast=True, log=logging.getLogger("t.retries"))

    with caplog.at_level(logging.WARNING), pytest.raises(BrokerUnreachable) as caught:
        retries.failed(refused())

    assert "gave up after 1 attempt(s)" in str(caught.value)
    assert isinstance(caught.value.__cause__, BrokerUnreachable)
    assert caplog.records == []


def test_the_last_attempt_raises_with_the_count_after_one_warning_per_earlier_attempt(caplog):
    retries = StartRetries(unreachable(3), fail_fast=False, log=logging.getLogger("t.retries"))

    with caplog.at_level(logging.WARNING):
        retries.failed(refused())
        retries.failed(refused())
        with pytest.raises(BrokerUnreachable) as caught:
            retries.failed(refused())

    assert "gave up after 3 attempt(s)" in str(caught.value)
    lines = [(r.name, r.getMessage()) for r in caplog.records]
    assert [name for name, _ in lines] == ["t.retries", "t.retries"]
    assert lines[0][1].startswith("broker not reachable (attempt 1 of 3): cannot connect to")
    assert lines[1][1].startswith("broker not reachable (attempt 2 of 3)")


def test_waits_double_from_the_first_delay_up_to_the_cap_with_jitter():
    retries = StartRetries(unreachable(10), fail_fast=False, log=logging.getLogger("t.retries"))

    waits = [retries.failed(refused()) for _ in range(9)]

    delays = [min(FIRST_DELAY * 2**n, DELAY_CAP) for n in range(9)]
    assert delays[-1] == DELAY_CAP
    for wait, delay in zip(waits, delays, strict=True):
        assert 0.8 * delay <= wait <= 1.2 * delay


async def test_a_worker_that_cannot_reach_the_broker_retries_then_raises(caplog):
    class Unreached(Listener):
        subscribes_to = "unreached.item"
        queue = "unreached.queue"

        async def handle(self, message: Item) -> None: ...

    worker = Worker([Unreached], unreachable(2), install_signals=False)
    caplog.set_level(logging.WARNING, "listener.worker")

    with pytest.raises(BrokerUnreachable) as caught:
        await asyncio.wait_for(worker.run(), 10)

    assert "gave up after 2 attempt(s)" in str(caught.value)
    retried = [r.getMessage() for r in caplog.records if r.name == "listener.worker"]
    assert len(retried) == 1
    assert retried[0].startswith("broker not reachable (attempt 1 of 2)")


async def test_a_worker_stopped_while_waiting_to_retry_returns_without_an_error(caplog):
    class Unreached(Listener):
        subscribes_to = "unreached.item"
        queue = "unreached.queue"

        async def handle(self, message: Item) -> None: ...

    worker = Worker([Unreached], unreachable(5), install_signals=False)

    with caplog.at_level(logging.WARNING, "listener.worker"):
        running = asyncio.ensure_future(worker.run())
        await eventually(lambda: any("attempt 1 of 5" in r.getMessage() for r in caplog.records))
        worker.request_stop("test")
        code = await asyncio.wait_for(running, 5)

    assert code == 0
    assert not any("attempt 2 of 5" in r.getMessage() for r in caplog.records)
