"""The job ledger: every attempt recorded, pending rows at notify, tags, states and where a
message is now; on SQLite and on the real PostgreSQL, with the real broker."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import Engine
from support.waiting import eventually

from listener import Listener, Reject, Retry, jobs
from listener.database import create_engine
from listener.ledger import LostAttempt, record_lost
from listener.recorder import recorder_for
from listener.recording import LedgerMiddleware
from listener.settings import Settings, get_settings

CLI = str(Path(sys.executable).with_name("amqp-listener"))
ROOT = Path(__file__).resolve().parents[1]


class Order(BaseModel):
    account: int
    instance: int
    fail: str = ""


@pytest.fixture
def ledger(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This process publishes with the database URL set (as an application would)."""
    monkeypatch.setenv("AMQP_LISTENER_DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield database_url
    recorder_for(database_url).close()
    get_settings.cache_clear()


def _order_listener(unique: str) -> type[Listener]:
    class Orders(Listener):
        subscribes_to = f"{unique}.order"
        queue = f"{unique}.orders"
        max_attempts = 2
        retry_delays = (0.05,)

        def handle(self, message: Order) -> None:
            if message.fail == "reject":
                raise Reject("not for us")
            if message.fail == "always":
                raise RuntimeError("disk full")
            if message.fail == "once" and "seen" not in self.__class__.__dict__:
                type(self).seen = True  # type: ignore[attr-defined]
                raise Retry(delay=0.05)

        def track(self, message: Order) -> Iterable[str]:
            return [f"Account:{message.account}", f"Instance:{message.instance}"]

    return Orders


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def _settled(engine: Engine, message_id: str, state: str) -> Callable[[], bool]:
    def check() -> bool:
        found = jobs.show(message_id, engine=engine)
        return bool(found) and found[0].state == state

    return check


async def test_a_handled_message_shows_its_publish_and_one_attempt_with_where_and_how_long(
    ledger: str, engine: Engine, settings: Settings, run_worker: Any, unique: str
) -> None:
    orders = _order_listener(unique)
    worker_settings = settings.with_database_url(ledger)
    async with run_worker(orders, middleware=[LedgerMiddleware(worker_settings)]):
        message_id = await orders.anotify(account=121, instance=532)
        await eventually(_settled(engine, message_id, "handled"), timeout=15)
    assert recorder_for(ledger).flush()  # the publish record, from this process
    [job] = jobs.show(message_id, engine=engine)
    assert job.state == "handled"
    assert job.where == "nowhere (acked)"
    assert job.listener == orders.name()
    assert job.tags == ("Account:121", "Instance:532")
    publish, attempt = job.attempts
    assert (publish.attempt, publish.outcome, publish.pid) == (0, "pending", os.getpid())
    assert (attempt.attempt, attempt.outcome) == (1, "handled")
    assert attempt.host == socket.gethostname()
    assert attempt.duration is not None
    assert attempt.finished_at is not None
    assert attempt.finished_at >= attempt.started_at


async def test_a_retried_then_parked_message_shows_each_failure_and_lies_in_the_dead_queue(
    ledger: str, engine: Engine, settings: Settings, run_worker: Any, unique: str
) -> None:
    orders = _order_listener(unique)
    worker_settings = settings.with_database_url(ledger)
    async with run_worker(orders, middleware=[LedgerMiddleware(worker_settings)]):
        message_id = await orders.anotify(account=7, instance=8, fail="always")
        await eventually(_settled(engine, message_id, "parked"), timeout=15)
    assert recorder_for(ledger).flush()  # the publish record, from this process
    [job] = jobs.show(message_id, engine=engine)
    assert job.where == f"{orders.queue}.dead"
    _, first, second = job.attempts
    assert (first.outcome, first.next_queue) == ("retried", f"{orders.queue}.retry.50ms")
    assert second.outcome == "parked"
    assert second.exception_type == "RuntimeError"
    assert second.exception_message == "disk full"
    assert second.traceback is not None
    assert "disk full" in second.traceback
    failed = orders.failed_jobs("Account:7")
    assert [found.message_id for found in failed] == [message_id]
    assert orders.pending_jobs("Account:7") == []
    assert jobs.find(tag="Instance:8", state="parked", engine=engine)[0].message_id == message_id


async def test_a_delayed_message_is_pending_with_its_due_time_and_counted_for_its_listener(
    ledger: str, engine: Engine, settings: Settings, run_worker: Any, unique: str, tmp_path: Path
) -> None:
    orders = _order_listener(unique)
    async with run_worker(orders):  # declares its topology, and the shared delay levels
        pass
    published = dt.datetime.now(dt.UTC)
    later = orders.notify(account=5, instance=1, delay=3600)
    orders.notify(account=5, instance=2, delay=7200)
    orders.notify(account=5, instance=3)  # not delayed: not counted
    assert recorder_for(ledger).flush()

    [job] = jobs.show(later, engine=engine)
    assert job.state == "pending"
    assert job.published is not None
    due = job.published.due_at
    assert due is not None
    assert dt.timedelta(seconds=3600) <= due - published < dt.timedelta(seconds=3610)
    assert job.where == f"the delay levels, due in {orders.queue} at {due.isoformat()}"
    assert jobs.delayed(engine=engine) == {orders.queue: 2}

    # `status` with the database: the per-listener count the broker cannot give.
    (tmp_path / f"{unique}_app.py").write_text(
        "from listener import Listener\n"
        "class Orders(Listener):\n"
        f"    subscribes_to = '{unique}.order'\n"
        f"    queue = '{orders.queue}'\n"
        "    def handle(self, message): ...\n"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [CLI, "status", f"{unique}_app", "--json", "--database-url", ledger],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "AMQP_URL": settings.url.get_secret_value(),
            "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
        },
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["listeners"]
    assert (row["queue"], row["delayed"]) == (orders.queue, 2)


async def test_a_message_not_yet_consumed_is_pending_and_found_by_its_tag(
    ledger: str, unique: str, rabbit: Any
) -> None:
    orders = _order_listener(unique)
    rabbit.declare_exchange(f"{unique}")
    rabbit.declare_queue(orders.queue, bind=(unique, "order"))
    message_id = orders.notify(account=121, instance=1)
    assert recorder_for(ledger).flush()
    [job] = orders.pending_jobs("Account:121")
    assert (job.message_id, job.state, job.where) == (message_id, "pending", orders.queue)
    assert job.published is not None
    assert job.published.pid == os.getpid()
    assert orders.failed_jobs("Account:121") == []


def test_an_unknown_state_is_refused_with_the_known_ones(ledger: str) -> None:
    with pytest.raises(ValueError, match="pending, running, retrying, handled, parked"):
        jobs.find(state="done")


def test_finding_without_a_database_says_how_to_configure_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AMQP_LISTENER_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    from listener.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="AMQP_LISTENER_DATABASE_URL"):
        jobs.find()
    get_settings.cache_clear()


def test_an_attempt_that_died_with_its_worker_is_recorded_as_worker_lost(engine: Engine) -> None:
    started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=3)
    lost = LostAttempt("m-1", "app:Orders", "orders", "host-a", 4242, started)
    assert record_lost(engine, [lost]) == 1
    [job] = jobs.show("m-1", engine=engine)
    [attempt] = job.attempts
    assert (attempt.outcome, attempt.host, attempt.pid) == ("worker_lost", "host-a", 4242)
    assert attempt.attempt == 1
    assert attempt.duration is not None and attempt.duration >= 3
    assert job.state == "retrying"
    assert job.where == "orders"


async def test_a_running_message_is_shown_running_then_its_one_row_becomes_handled(
    database_url: str, engine: Engine, settings: Settings, run_worker: Any, unique: str
) -> None:
    release = asyncio.Event()

    class Slow(Listener):
        subscribes_to = f"{unique}.slow"
        queue = f"{unique}.slow"

        async def handle(self, message: int) -> None:
            await release.wait()

    worker_settings = settings.with_database_url(database_url)
    async with run_worker(Slow, middleware=[LedgerMiddleware(worker_settings)]):
        message_id = await Slow.anotify(1)
        await eventually(_settled(engine, message_id, "running"), timeout=15)
        [job] = jobs.show(message_id, engine=engine)
        assert job.where == f"being handled on {socket.gethostname()} pid {os.getpid()}"
        release.set()
        await eventually(_settled(engine, message_id, "handled"), timeout=15)
    [job] = jobs.show(message_id, engine=engine)
    assert [attempt.outcome for attempt in job.attempts] == ["handled"]


async def test_a_message_from_a_foreign_publisher_is_tagged_by_the_worker(
    database_url: str, engine: Engine, settings: Settings, run_worker: Any, unique: str, rabbit: Any
) -> None:
    orders = _order_listener(unique)
    worker_settings = settings.with_database_url(database_url)
    async with run_worker(orders, middleware=[LedgerMiddleware(worker_settings)]):
        body = b'{"account": 5, "instance": 6}'
        rabbit.publish(
            unique, "order", body, message_id="foreign-1", content_type="application/json"
        )
        await eventually(_settled(engine, "foreign-1", "handled"), timeout=15)
    assert [job.message_id for job in jobs.find(tag="Account:5", engine=engine)] == ["foreign-1"]
