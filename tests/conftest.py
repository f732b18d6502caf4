"""Shared fixtures: the real broker, unique names per test, cleanup, an in-process worker.

Tests that cross the wire talk to a real RabbitMQ (`AMQP_TEST_URL`, default the local
broker). Without one they are skipped locally and fail in CI (`CI` set), so a green CI run
always means the broker tests ran. They are marked `rabbitmq` by the fixtures they use; a
test that reaches a broker without them carries the marker itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from listener import delay, registry
from listener.listener import Listener
from listener.middleware import Middleware
from listener.runner.worker import Worker
from listener.settings import Settings

AMQP_TEST_URL = os.environ.get("AMQP_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
#: The fixtures that need RabbitMQ: the test broker, and the nodes the fault suite starts.
BROKER_FIXTURES = frozenset({"amqp_url", "node"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `rabbitmq` every test that uses a broker fixture, directly or through another
    fixture, so that `make test-fast` (`-m "not slow and not rabbitmq"`) runs the rest."""
    for item in items:
        if BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.rabbitmq)


def _broker_answers(url: str) -> bool:
    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
    except pika.exceptions.AMQPError:
        return False
    return True


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The broker URL for tests; skips (locally) or fails (CI) when nothing answers."""
    if not _broker_answers(AMQP_TEST_URL):
        message = f"no RabbitMQ answering at {AMQP_TEST_URL}: start it (rabbitmq-server -detached)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return AMQP_TEST_URL


@pytest.fixture(autouse=True)
def _forget_listeners() -> Iterator[None]:
    """Listener classes defined by one test are invisible to the next."""
    yield
    registry.clear()


@pytest.fixture
def unique() -> str:
    """A short token unique to this test, for exchange and queue names."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def settings(amqp_url: str) -> Settings:
    """Settings pointing at the test broker, with short timeouts for tests."""
    return Settings(url=amqp_url, grace_period=5, confirm_timeout=5, connect_attempts=1)


class Rabbit:
    """A small synchronous view of the broker for assertions (pika, outside the framework)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()
        self.entries: set[str] = set()  # keys bound from the delay entry to the top level

    def _ch(self) -> Any:
        if self.connection.is_closed:
            self.connection = pika.BlockingConnection(pika.URLParameters(self.url))
        if self.channel.is_closed:
            self.channel = self.connection.channel()
        return self.channel

    def track(self, cls: type[Listener]) -> None:
        """Delete `cls`'s exchange and every queue of its topology after the test."""
        topology = cls.topology()
        self.exchanges.add(topology.exchange)
        self.queues.update(spec.name for spec in topology.queues)
        # The delay levels are shared and stay; the listener's way into them goes.
        self.entries.update(
            binding.key for binding in topology.delay_bindings if binding.to_exchange
        )

    def track_delay_entry(self, queue: str, *addresses: str) -> None:
        """Unbind the keys of a listener declared by another process from the delay entry:
        its queue's, and each of its `addresses` ("exchange.key")."""
        self.entries.add(delay.target_key(queue))
        for address in addresses:
            exchange, _, key = address.partition(".")
            self.entries.add(delay.address_key(exchange, key))

    def declare_exchange(self, name: str) -> None:
        self._ch().exchange_declare(name, "topic", durable=True)
        self.exchanges.add(name)

    def declare_queue(
        self, name: str, *, bind: tuple[str, str] | None = None, **arguments: Any
    ) -> None:
        self._ch().queue_declare(name, durable=True, arguments=arguments or None)
        self.queues.add(name)
        if bind:
            self._ch().queue_bind(name, bind[0], bind[1])

    def publish(self, exchange: str, key: str, body: bytes, **properties: Any) -> None:
        """Publish like a foreign client would (no framework involved)."""
        self._ch().basic_publish(exchange, key, body, pika.BasicProperties(**properties))

    def get(self, queue: str) -> tuple[pika.BasicProperties, bytes] | None:
        """Take one message (acked) or None."""
        method, properties, body = self._ch().basic_get(queue, auto_ack=True)
        return None if method is None else (properties, body)

    def wait_message(self, queue: str, timeout: float = 15.0) -> tuple[pika.BasicProperties, bytes]:
        """Take one message, waiting up to `timeout` seconds for it to arrive."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.get(queue)
            if got is not None:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"no message arrived in {queue!r} within {timeout}s")
            self.connection.sleep(0.02)

    def drain(self, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
        """Take every message now in `queue`."""
        taken = []
        while (got := self.get(queue)) is not None:
            taken.append(got)
        return taken

    def count(self, queue: str) -> int:
        """Ready messages in `queue` (passive declare; may lag a moment behind publishes)."""
        return int(self._ch().queue_declare(queue, passive=True).method.message_count)

    def consumers(self, queue: str) -> int:
        """Consumers on `queue` now; 0 when it does not exist."""
        try:
            return int(self._ch().queue_declare(queue, passive=True).method.consumer_count)
        except pika.exceptions.ChannelClosedByBroker:
            return 0

    def delete_queue(self, queue: str) -> None:
        self._ch().queue_delete(queue)

    def exists(self, queue: str) -> bool:
        try:
            self._ch().queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return False
        return True

    def cleanup(self) -> None:
        # A fresh connection: a test may have had the broker close the old one.
        with contextlib.suppress(Exception):
            self.connection.close()
        self.connection = pika.BlockingConnection(pika.URLParameters(self.url))
        self.channel = self.connection.channel()
        for cls in registry.all_listeners():
            with contextlib.suppress(Exception):
                self.track(cls)
        for queue in sorted(self.queues):
            with contextlib.suppress(Exception):
                self._ch().queue_delete(queue)
        for exchange in self.exchanges:
            with contextlib.suppress(Exception):
                self._ch().exchange_delete(exchange)
        top = delay.level_name(delay.LEVELS - 1)
        for key in self.entries:
            with contextlib.suppress(Exception):
                self._ch().exchange_unbind(top, delay.ENTRY_EXCHANGE, key)
        with contextlib.suppress(Exception):
            self.connection.close()


@pytest.fixture
def rabbit(amqp_url: str) -> Iterator[Rabbit]:
    """The broker, seen from outside; deletes what the test's listeners declared."""
    helper = Rabbit(amqp_url)
    yield helper
    helper.cleanup()


@pytest.fixture
async def run_worker(
    settings: Settings, rabbit: Rabbit
) -> AsyncIterator[Callable[..., contextlib.AbstractAsyncContextManager[Worker]]]:
    """`async with run_worker(FileCopier, ...) as worker:` hosts listeners in this process."""

    @contextlib.asynccontextmanager
    async def start(
        *listeners: type[Listener],
        worker_settings: Settings | None = None,
        middleware: list[Middleware] | None = None,
    ) -> AsyncIterator[Worker]:
        for cls in listeners:
            rabbit.track(cls)
        worker = Worker(
            listeners, worker_settings or settings, install_signals=False, middleware=middleware
        )
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 15
        while not worker.ready:
            if task.done():
                task.result()  # start-up failed: raise its error here
            if time.monotonic() > deadline:
                raise AssertionError("worker did not become ready within 15s")
            await asyncio.sleep(0.01)
        try:
            yield worker
        finally:
            worker.request_stop("test finished")
            await asyncio.wait_for(task, timeout=30)

    yield start


# -- databases (the ledger, outbox and inbox) --------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this session's own, at the newest schema, dropped at the end."""
    from support.databases import postgres_answers, scratch_postgres, upgraded

    if not postgres_answers():
        message = "no PostgreSQL answering at 127.0.0.1:5432 (set POSTGRES_TEST_URL)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with scratch_postgres() as url:
        yield upgraded(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """An upgraded, empty database: a SQLite file, then the session's PostgreSQL database."""
    from support.databases import empty_ledger, upgraded

    if request.param == "sqlite":
        return upgraded(f"sqlite:///{tmp_path}/ledger.db")
    url: str = request.getfixturevalue("postgres_url")
    empty_ledger(url)
    return url
