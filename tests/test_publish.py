"""Publishing against the real broker: `notify()` and its twins, confirms, and every way a
message can fail to be safely with the broker.

No worker runs here: each test binds its own probe queue to the listener's exchange and looks
at what arrived. Network faults go through `support.proxy.TcpProxy`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel
from support.proxy import TcpProxy

import listener
from listener import AsyncPublisher, Listener, Publisher, Settings
from listener import publisher as publisher_module
from listener.apublisher import default_async_publisher
from listener.publisher import default_publisher
from listener.settings import get_settings


class CopyRequest(BaseModel):
    case_id: int
    src: str
    dst: str


@pytest.fixture
def probe(unique: str, rabbit: Any) -> str:
    """A queue bound to exchange `unique` with key `key`: where published messages land."""
    rabbit.declare_exchange(unique)
    name = f"{unique}.probe"
    rabbit.declare_queue(name, bind=(unique, "key"))
    return name


@pytest.fixture
def copier(unique: str) -> type[Listener]:
    """A listener on `<unique>.key` (its own queue is never declared: no worker runs)."""

    class FileCopier(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.file_copier"

        def handle(self, message: CopyRequest) -> None: ...

    return FileCopier


@pytest.fixture
async def loop_publisher_closed() -> AsyncIterator[None]:
    """Close this event loop's default publisher (behind anotify) when the test ends."""
    yield
    await default_async_publisher().aclose()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    """A TCP proxy to the broker; stopped (thread joined, sockets closed) after the test."""
    running = TcpProxy()
    running.start()
    try:
        yield running
    finally:
        running.stop()
    assert not running.running
    assert not any(t.name == "tcp-proxy" and t.is_alive() for t in threading.enumerate())


def proxied(proxy: TcpProxy, **settings: Any) -> Settings:
    return Settings(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F", **settings)


def wait_for_messages(rabbit: Any, queue: str, count: int, timeout: float = 15.0) -> list[Any]:
    """Take `count` messages from `queue`, waiting for them to arrive."""
    taken = [rabbit.wait_message(queue, timeout)]
    deadline = time.monotonic() + timeout
    while len(taken) < count:
        taken.extend(rabbit.drain(queue))
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(taken)} of {count} messages arrived in {queue!r}")
        rabbit.connection.sleep(0.02)
    return taken


def run_with_deadline(
    work: Callable[[], Any], deadline: float
) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `work()` on a thread for up to `deadline` seconds; returns the thread (alive if
    `work` has not finished) and {"value": ...} or {"error": ...}."""
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["value"] = work()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=call, name="publish-under-test", daemon=True)
    thread.start()
    thread.join(deadline)
    return thread, result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- refused, unroutable, nacked ------------------------------------------------------------------


def test_notify_to_an_exchange_with_no_bound_queue_raises_unroutable_with_the_message_id(
    unique, rabbit, copier
):
    rabbit.declare_exchange(unique)  # exists, but nothing is bound to it

    with pytest.raises(listener.Unroutable) as caught:
        copier.notify(case_id=1, src="a", dst="b")

    assert caught.value.message_id
    assert caught.value.message_id in str(caught.value)
    assert repr(unique) in str(caught.value)
    assert isinstance(caught.value, listener.PublishError)


def test_notify_to_a_missing_exchange_raises_unroutable_and_the_next_notify_still_works(
    unique, rabbit, copier, probe
):
    class Orphan(Listener):
        subscribes_to = f"{unique}missing.key"

        def handle(self, message: CopyRequest) -> None: ...

    with pytest.raises(listener.Unroutable) as caught:
        Orphan.notify(case_id=1, src="a", dst="b")
    assert f"'{unique}missing'" in str(caught.value)
    assert caught.value.message_id

    # The broker closed the channel for the unknown exchange: the same thread goes on.
    message_id = copier.notify(case_id=2, src="a", dst="b")
    properties, _body = rabbit.wait_message(probe)
    assert properties.message_id == message_id


async def test_anotify_to_an_exchange_with_no_bound_queue_raises_unroutable(
    unique, rabbit, copier, loop_publisher_closed
):
    rabbit.declare_exchange(unique)

    with pytest.raises(listener.Unroutable) as caught:
        await copier.anotify(case_id=1, src="a", dst="b")

    assert caught.value.message_id
    assert caught.value.message_id in str(caught.value)


async def test_anotify_to_a_missing_exchange_raises_unroutable_and_the_next_anotify_works(
    unique, rabbit, copier, probe, loop_publisher_closed
):
    class Orphan(Listener):
        subscribes_to = f"{unique}missing.key"

        async def handle(self, message: CopyRequest) -> None: ...

    with pytest.raises(listener.Unroutable) as caught:
        await Orphan.anotify(case_id=1, src="a", dst="b")
    assert f"'{unique}missing'" in str(caught.value)
    assert caught.value.message_id

    message_id = await copier.anotify(case_id=2, src="a", dst="b")
    properties, _body = await asyncio.to_thread(rabbit.wait_message, probe)
    assert properties.message_id == message_id


def full_queue(rabbit: Any, unique: str) -> str:
    """A quorum queue bound to `<unique>.key` that refuses publishes once it holds a message."""
    rabbit.declare_exchange(unique)
    name = f"{unique}.full"
    rabbit.declare_queue(
        name,
        bind=(unique, "key"),
        **{"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"},
    )
    return name


def test_a_queue_that_rejects_publishes_makes_notify_raise_publish_nacked(unique, rabbit, copier):
    queue = full_queue(rabbit, unique)
    accepted: list[str] = []

    # RabbitMQ 3.10 quorum queues apply the length limit one message late: x-max-length=1
    # takes two messages, then nacks.
    with pytest.raises(listener.PublishNacked) as caught:
        for n in range(5):
            accepted.append(copier.notify(case_id=n, src="a", dst="b"))

    assert 1 <= len(accepted) <= 2
    assert caught.value.message_id
    assert caught.value.message_id not in accepted
    assert caught.value.message_id in str(caught.value)
    assert [p.message_id for p, _ in rabbit.drain(queue)] == accepted


async def test_a_queue_that_rejects_publishes_makes_anotify_raise_publish_nacked(
    unique, rabbit, copier, loop_publisher_closed
):
    queue = full_queue(rabbit, unique)
    accepted: list[str] = []

    with pytest.raises(listener.PublishNacked) as caught:
        for n in range(5):
            accepted.append(await copier.anotify(case_id=n, src="a", dst="b"))

    assert 1 <= len(accepted) <= 2
    assert caught.value.message_id not in accepted
    assert [p.message_id for p, _ in rabbit.drain(queue)] == accepted


# RabbitMQ 3.10.8 nacks every publish on a channel that first published in the ~0.5 s after a
# quorum leader's node died, for as long as that channel lives: after a nack, a publisher
# must not publish on the same channel again (the cluster suite's leader kill meets it).


def test_after_a_nack_the_next_notify_publishes_on_a_new_connection(unique, rabbit, proxy):
    full_queue(rabbit, unique)
    rabbit.declare_queue(f"{unique}.other", bind=(unique, "other"))
    publisher = Publisher(proxied(proxy))
    try:
        with pytest.raises(listener.PublishNacked):
            for n in range(5):
                publisher.publish(f"{unique}.key", {"n": n})
        assert proxy.accepted == 1
        after = publisher.publish(f"{unique}.other", {"n": "after"})
    finally:
        publisher.close()

    assert proxy.accepted == 2  # the nacked channel's connection was not used again
    assert rabbit.wait_message(f"{unique}.other")[0].message_id == after


async def test_after_a_nack_the_next_anotify_and_batch_publish_on_a_new_channel(
    unique, rabbit, proxy
):
    full_queue(rabbit, unique)
    rabbit.declare_queue(f"{unique}.other", bind=(unique, "other"))
    publisher = AsyncPublisher(proxied(proxy))
    try:
        await publisher.publish(f"{unique}.other", {"n": 0})
        used = await publisher._backend.underlay()
        with pytest.raises(listener.PublishNacked):
            for n in range(5):
                await publisher.publish(f"{unique}.key", {"n": n})
        after_one = await publisher._backend.underlay()
        with pytest.raises(listener.PublishNacked):  # the queue is full: all are nacked
            await publisher.publish_bodies(unique, "key", [b"{}"] * 4)
        after_batch = await publisher._backend.underlay()
        await publisher.publish(f"{unique}.other", {"n": 6})
    finally:
        await publisher.aclose()

    # A fresh channel after each nack (the broker may give it the freed number again).
    assert after_one is not used and after_batch is not after_one
    assert used.is_closed and after_one.is_closed
    assert proxy.accepted == 1  # on the same connection: only the channel is suspect
    assert len(await asyncio.to_thread(wait_for_messages, rabbit, f"{unique}.other", 2)) == 2


def test_an_invalid_message_raises_invalid_message_naming_fields_not_values_and_sends_nothing(
    rabbit, copier, probe
):
    with pytest.raises(listener.InvalidMessage) as caught:
        copier.notify(case_id="hunter2-secret", src="a")

    text = str(caught.value)
    assert "case_id" in text
    assert "dst" in text
    assert "hunter2-secret" not in text
    with pytest.raises(listener.InvalidMessage):
        copier.notify_many([{"case_id": 1, "src": "a", "dst": "b"}, {"case_id": "x"}])
    assert rabbit.count(probe) == 0  # validated before anything was sent


def test_a_body_over_max_body_bytes_raises_value_error_before_anything_is_sent(
    unique, rabbit, probe, proxy
):
    publisher = Publisher(proxied(proxy, max_body_bytes=64))
    try:
        with pytest.raises(ValueError, match="64 byte limit"):
            publisher.publish(f"{unique}.key", {"blob": "x" * 100})
        assert proxy.accepted == 0  # not even a connection was opened
        assert publisher.publish(f"{unique}.key", {"blob": "x"})  # a small one goes through
    finally:
        publisher.close()
    assert [json.loads(body) for _, body in wait_for_messages(rabbit, probe, 1)] == [{"blob": "x"}]


async def test_an_async_body_over_max_body_bytes_raises_value_error_before_it_is_sent(
    unique, rabbit, probe, amqp_url
):
    publisher = AsyncPublisher(Settings(url=amqp_url, max_body_bytes=64))
    try:
        with pytest.raises(ValueError, match="64 byte limit"):
            await publisher.publish(f"{unique}.key", {"blob": "x" * 100})
        assert await publisher.publish(f"{unique}.key", {"blob": "x"})
    finally:
        await publisher.aclose()
    messages = await asyncio.to_thread(wait_for_messages, rabbit, probe, 1)
    assert [json.loads(body) for _, body in messages] == [{"blob": "x"}]


async def test_a_batch_with_one_body_over_max_body_bytes_sends_none_of_it(
    unique, rabbit, probe, amqp_url
):
    publisher = AsyncPublisher(Settings(url=amqp_url, max_body_bytes=64))
    small = json.dumps({"n": 1}).encode()
    large = json.dumps({"blob": "x" * 100}).encode()
    try:
        with pytest.raises(ValueError, match="64 byte limit"):
            await publisher.publish_bodies(unique, "key", [small, large])
    finally:
        await publisher.aclose()
    await asyncio.sleep(0.3)
    # Knowable before the first send, like a message that fails its model: all or nothing.
    assert rabbit.drain(probe) == []


# -- broker unreachable, credentials refused ------------------------------------------------------


@pytest.mark.rabbitmq  # a broker that refuses the login
def test_a_wrong_password_raises_authentication_failed_without_the_password(unique):
    publisher = Publisher(Settings(url="amqp://guest:Sup3r-s3cret-pw@127.0.0.1:5672/%2F"))

    with pytest.raises(listener.AuthenticationFailed) as caught:
        publisher.publish(f"{unique}.key", {"n": 1})

    assert "Sup3r-s3cret-pw" not in str(caught.value)
    assert "guest:***@127.0.0.1:5672" in str(caught.value)


@pytest.mark.rabbitmq  # a broker that refuses the login
async def test_a_wrong_password_raises_authentication_failed_in_the_async_publisher(unique):
    publisher = AsyncPublisher(Settings(url="amqp://guest:Sup3r-s3cret-pw@127.0.0.1:5672/%2F"))

    with pytest.raises(listener.AuthenticationFailed) as caught:
        await publisher.publish(f"{unique}.key", {"n": 1})

    assert "Sup3r-s3cret-pw" not in str(caught.value)
    await publisher.aclose()


def test_a_port_where_nothing_listens_raises_broker_unreachable(unique):
    port = free_port()
    publisher = Publisher(Settings(url=f"amqp://guest:pw-n0t-shown@127.0.0.1:{port}/%2F"))

    with pytest.raises(listener.BrokerUnreachable) as caught:
        publisher.publish(f"{unique}.key", {"n": 1})

    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "pw-n0t-shown" not in str(caught.value)


async def test_a_port_where_nothing_listens_raises_broker_unreachable_in_the_async_publisher(
    unique,
):
    port = free_port()
    publisher = AsyncPublisher(Settings(url=f"amqp://guest:pw-n0t-shown@127.0.0.1:{port}/%2F"))

    with pytest.raises(listener.BrokerUnreachable) as caught:
        await publisher.publish(f"{unique}.key", {"n": 1})

    assert "pw-n0t-shown" not in str(caught.value)
    await publisher.aclose()


def test_a_connection_cut_during_the_handshake_is_unreachable_not_refused_credentials(
    unique, proxy
):
    proxy.cut_after(8)  # the AMQP header goes through; the login never reaches the broker
    publisher = Publisher(proxied(proxy))

    with pytest.raises(listener.BrokerError) as caught:
        publisher.publish(f"{unique}.key", {"n": 1})

    # The password was never checked: calling it refused would send an operator to fix
    # credentials that are right (and the runner treats refused logins as fatal).
    assert not isinstance(caught.value, listener.AuthenticationFailed), str(caught.value)
    assert isinstance(caught.value, listener.BrokerUnreachable)


async def test_an_async_connection_cut_during_the_handshake_is_unreachable(unique, proxy):
    proxy.cut_after(8)
    publisher = AsyncPublisher(proxied(proxy))

    with pytest.raises(listener.BrokerUnreachable):
        await publisher.publish(f"{unique}.key", {"n": 1})
    await publisher.aclose()


# -- connect failures are publish failures too ---------------------------------------------------

#: (URL, the PublishError subclass, the BrokerError it also is). The password is never shown.
CONNECT_FAILURES = [
    pytest.param(
        "amqp://guest:n0t-the-pw@127.0.0.1:1/%2F",
        listener.PublishUnreachable,
        listener.BrokerUnreachable,
        id="unreachable",
    ),
    pytest.param(
        "amqp://guest:n0t-the-pw@127.0.0.1:5672/%2F",
        listener.PublishRefused,
        listener.AuthenticationFailed,
        id="wrong-password",
        marks=pytest.mark.rabbitmq,  # a broker that refuses the login
    ),
]


@pytest.fixture
def default_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """`default_url(url)` points notify(), publish() and their async twins at `url`; the
    process-wide publisher and settings are restored after the test."""
    monkeypatch.setattr(publisher_module, "_default", None)

    def use(url: str) -> None:
        monkeypatch.setenv("AMQP_URL", url)
        get_settings.cache_clear()

    yield use
    created = publisher_module._default
    if created is not None:
        created.close()
    get_settings.cache_clear()  # the environment is restored next; read it afresh


def assert_publish_connect_failure(
    error: BaseException, publish_class: type, broker_class: type
) -> None:
    assert isinstance(error, listener.PublishError), type(error).__mro__
    assert isinstance(error, broker_class), type(error).__mro__
    assert isinstance(error, publish_class), type(error).__mro__
    assert "n0t-the-pw" not in str(error)


@pytest.mark.parametrize("send", ["notify", "publish"])
@pytest.mark.parametrize(("url", "publish_class", "broker_class"), CONNECT_FAILURES)
def test_a_broker_that_cannot_be_reached_or_refuses_the_login_is_a_publish_error_for_notify(
    unique, copier, default_url, send, url, publish_class, broker_class
):
    default_url(url)

    with pytest.raises(listener.PublishError) as caught:
        if send == "notify":
            copier.notify(case_id=1, src="a", dst="b")
        else:
            listener.publish(f"{unique}.key", {"n": 1})

    assert_publish_connect_failure(caught.value, publish_class, broker_class)


@pytest.mark.parametrize("send", ["anotify", "apublish"])
@pytest.mark.parametrize(("url", "publish_class", "broker_class"), CONNECT_FAILURES)
async def test_a_broker_that_cannot_be_reached_or_refuses_the_login_is_a_publish_error_for_anotify(
    unique, copier, default_url, loop_publisher_closed, send, url, publish_class, broker_class
):
    default_url(url)

    with pytest.raises(listener.PublishError) as caught:
        if send == "anotify":
            await copier.anotify(case_id=1, src="a", dst="b")
        else:
            await listener.apublish(f"{unique}.key", {"n": 1})

    assert_publish_connect_failure(caught.value, publish_class, broker_class)


# -- network faults through the proxy -------------------------------------------------------------


def test_a_blackholed_connection_raises_publish_timeout_saying_the_outcome_is_unknown(
    unique, rabbit, probe, proxy
):
    publisher = Publisher(proxied(proxy, confirm_timeout=1))

    def work() -> tuple[str, float]:
        first = publisher.publish(f"{unique}.key", {"n": 1})  # the connection is open
        proxy.blackhole()
        started = time.monotonic()
        try:
            publisher.publish(f"{unique}.key", {"n": 2})
        finally:
            elapsed = time.monotonic() - started
        return first, elapsed

    thread, result = run_with_deadline(work, 6)
    finished = not thread.is_alive()
    proxy.reset()  # frees a publish still waiting (so the test ends) and the blackholed socket
    thread.join(10)
    try:
        assert finished, (
            "publish() with confirm_timeout=1 was still waiting for its confirm after 6s: "
            "the confirm time-out is not enforced"
        )
        error = result.get("error")
        assert isinstance(error, listener.PublishTimeout), result
        text = str(error)
        assert "outcome unknown" in text.lower()
        assert error.message_id
        assert error.message_id in text
        # Once the network is back, publishing goes on.
        assert publisher.publish(f"{unique}.key", {"n": 3})
    finally:
        publisher.close()


async def test_a_blackholed_async_connection_raises_publish_timeout(unique, rabbit, probe, proxy):
    publisher = AsyncPublisher(proxied(proxy, confirm_timeout=1))
    try:
        await publisher.publish(f"{unique}.key", {"n": 1})
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(listener.PublishTimeout) as caught:
            await publisher.publish(f"{unique}.key", {"n": 2})
        assert 0.9 <= time.monotonic() - started < 5
        assert "outcome unknown" in str(caught.value).lower()
        assert caught.value.message_id in str(caught.value)
    finally:
        proxy.reset()
        await publisher.aclose()


async def test_a_blackholed_batch_raises_publish_timeout_once_its_window_deadline_passed(
    unique, rabbit, probe, proxy
):
    publisher = AsyncPublisher(proxied(proxy, confirm_timeout=1))
    try:
        await publisher.publish(f"{unique}.key", {"n": 0})
        proxy.blackhole()
        bodies = [json.dumps({"n": n}).encode() for n in range(1, 301)]
        started = time.monotonic()
        with pytest.raises(listener.PublishTimeout) as caught:
            await publisher.publish_bodies(unique, "key", bodies)
        # One deadline for the whole window (not 300 timers one after the other).
        assert 0.9 <= time.monotonic() - started < 5
        assert "outcome unknown" in str(caught.value).lower()
        assert caught.value.message_id in str(caught.value)
        assert not [t for t in asyncio.all_tasks() if "_send" in repr(t.get_coro())]
    finally:
        proxy.reset()
        await publisher.aclose()


def test_after_a_connection_reset_the_next_publish_reopens_and_succeeds(
    unique, rabbit, probe, proxy
):
    publisher = Publisher(proxied(proxy, confirm_timeout=2))
    try:
        first = publisher.publish(f"{unique}.key", {"n": 1})
        proxy.reset()
        second = publisher.publish(f"{unique}.key", {"n": 2})
    finally:
        publisher.close()

    assert proxy.accepted == 2
    assert [p.message_id for p, _ in wait_for_messages(rabbit, probe, 2)] == [first, second]


async def test_after_a_connection_reset_the_next_async_publish_reopens_and_succeeds(
    unique, rabbit, probe, proxy
):
    publisher = AsyncPublisher(proxied(proxy, confirm_timeout=2))
    try:
        first = await publisher.publish(f"{unique}.key", {"n": 1})
        proxy.reset()
        await asyncio.sleep(0.2)  # the client has seen the connection close
        second = await publisher.publish(f"{unique}.key", {"n": 2})
        third = await publisher.publish(f"{unique}.key", {"n": 3})
    finally:
        await publisher.aclose()

    messages = await asyncio.to_thread(wait_for_messages, rabbit, probe, 3)
    assert [p.message_id for p, _ in messages] == [first, second, third]


def test_a_reset_while_waiting_for_the_confirm_raises_publish_connection_lost(
    unique, rabbit, probe, proxy
):
    publisher = Publisher(proxied(proxy, confirm_timeout=10))
    publisher.publish(f"{unique}.key", {"n": 1})
    proxy.blackhole()  # the next publish and its confirm are stuck in the proxy
    timer = threading.Timer(0.3, proxy.reset)
    timer.start()
    try:
        with pytest.raises(listener.PublishConnectionLost) as caught:
            publisher.publish(f"{unique}.key", {"n": 2})
    finally:
        timer.join()
        publisher.close()

    text = str(caught.value)
    assert "outcome unknown" in text.lower()
    assert caught.value.message_id in text
    assert [json.loads(body) for _, body in wait_for_messages(rabbit, probe, 1)] == [{"n": 1}]


async def test_a_reset_while_waiting_for_an_async_confirm_raises_publish_connection_lost(
    unique, rabbit, probe, proxy
):
    publisher = AsyncPublisher(proxied(proxy, confirm_timeout=10))
    try:
        await publisher.publish(f"{unique}.key", {"n": 1})
        proxy.blackhole()
        asyncio.get_running_loop().call_later(0.3, proxy.reset)
        with pytest.raises(listener.PublishConnectionLost) as caught:
            await publisher.publish(f"{unique}.key", {"n": 2})
    finally:
        await publisher.aclose()

    assert caught.value.message_id in str(caught.value)


def publish_through_resets(publish: Callable[[int], str], proxy: TcpProxy, count: int) -> Any:
    """Publish `count` messages while the proxy resets every connection every 20 ms."""
    stop = threading.Event()

    def resets() -> None:
        while not stop.wait(0.02):
            proxy.reset()

    resetter = threading.Thread(target=resets, name="proxy-resets", daemon=True)
    confirmed: list[str] = []
    failures: list[BaseException] = []
    resetter.start()
    try:
        for n in range(count):
            try:
                confirmed.append(publish(n))
            except Exception as exc:
                failures.append(exc)
    finally:
        stop.set()
        resetter.join()
    return confirmed, failures


def test_publishes_through_connection_resets_either_confirm_or_raise_and_lose_nothing(
    unique, rabbit, probe, proxy
):
    publisher = Publisher(proxied(proxy, confirm_timeout=2))
    try:
        confirmed, failures = publish_through_resets(
            lambda n: publisher.publish(f"{unique}.key", {"n": n}), proxy, 150
        )
    finally:
        publisher.close()

    assert confirmed, "no publish got through: the resets came too fast to test anything"
    assert failures, "no publish met a reset: the test did not test anything"
    allowed = (listener.PublishConnectionLost, listener.PublishTimeout, listener.BrokerUnreachable)
    unexpected = [f"{type(e).__name__}: {e}" for e in failures if not isinstance(e, allowed)]
    assert unexpected == []
    queued = {p.message_id for p, _ in rabbit.drain(probe)}
    assert set(confirmed) <= queued  # every id returned is really queued


async def test_async_publishes_through_connection_resets_either_confirm_or_raise(
    unique, rabbit, probe, proxy
):
    publisher = AsyncPublisher(proxied(proxy, confirm_timeout=2))
    loop = asyncio.get_running_loop()

    def publish(n: int) -> str:
        future = asyncio.run_coroutine_threadsafe(
            publisher.publish(f"{unique}.key", {"n": n}), loop
        )
        return future.result(10)

    try:
        confirmed, failures = await asyncio.to_thread(publish_through_resets, publish, proxy, 150)
    finally:
        await publisher.aclose()

    assert confirmed
    assert failures
    allowed = (listener.PublishConnectionLost, listener.PublishTimeout, listener.BrokerUnreachable)
    unexpected = [f"{type(e).__name__}: {e}" for e in failures if not isinstance(e, allowed)]
    assert unexpected == []
    queued = {p.message_id for p, _ in rabbit.drain(probe)}
    assert set(confirmed) <= queued


def test_a_publisher_does_not_keep_a_connection_open_for_each_thread_that_ended(
    unique, probe, proxy
):
    publisher = Publisher(proxied(proxy))
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(publisher.publish, f"{unique}.key", {"n": 0}).result()
        # Short-lived threads, as a threaded web server has: each publishes once and ends.
        for n in range(1, 9):
            thread = threading.Thread(target=publisher.publish, args=(f"{unique}.key", {"n": n}))
            thread.start()
            thread.join()
        gc.collect()
        deadline = time.monotonic() + 3
        while proxy.open_connections > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        leaked = proxy.open_connections
    finally:
        publisher.close()

    assert leaked <= 1, f"{leaked} connections stay open for 9 threads that have all ended"


# -- the publishing API ---------------------------------------------------------------------------


def test_notify_returns_the_id_of_a_confirmed_persistent_json_message(rabbit, copier, probe):
    before = int(time.time())
    message_id = copier.notify(case_id=1, src="/in/a.txt", dst="/out/a.txt")

    properties, body = rabbit.wait_message(probe)
    assert properties.message_id == message_id
    assert len(message_id) == 32
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert before - 1 <= properties.timestamp <= time.time() + 1
    assert json.loads(body) == {"case_id": 1, "src": "/in/a.txt", "dst": "/out/a.txt"}


def test_notify_takes_a_model_instance_or_keyword_fields_and_extra_headers(rabbit, copier, probe):
    by_model = copier.notify(CopyRequest(case_id=1, src="a", dst="b"))
    by_fields = copier.notify(case_id=2, src="c", dst="d", headers={"tenant": "acme"})

    messages = wait_for_messages(rabbit, probe, 2)
    assert [p.message_id for p, _ in messages] == [by_model, by_fields]
    assert [json.loads(b) for _, b in messages] == [
        {"case_id": 1, "src": "a", "dst": "b"},
        {"case_id": 2, "src": "c", "dst": "d"},
    ]
    assert (messages[1][0].headers or {}).get("tenant") == "acme"
    with pytest.raises(TypeError, match="not both"):
        copier.notify(CopyRequest(case_id=3, src="e", dst="f"), case_id=4)


async def test_anotify_publishes_like_notify(rabbit, copier, probe, loop_publisher_closed):
    message_id = await copier.anotify(case_id=7, src="a", dst="b")

    properties, body = await asyncio.to_thread(rabbit.wait_message, probe)
    assert properties.message_id == message_id
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert properties.timestamp
    assert json.loads(body) == {"case_id": 7, "src": "a", "dst": "b"}


def test_notify_many_returns_the_ids_in_order_once_all_are_confirmed(rabbit, copier, probe):
    batch = [CopyRequest(case_id=n, src="a", dst="b") for n in range(20)]
    batch.append({"case_id": 20, "src": "a", "dst": "b"})  # type: ignore[arg-type]

    ids = copier.notify_many(batch)

    assert len(ids) == len(set(ids)) == 21
    messages = wait_for_messages(rabbit, probe, 21)
    assert [p.message_id for p, _ in messages] == ids
    assert [json.loads(b)["case_id"] for _, b in messages] == list(range(21))


async def test_anotify_many_returns_the_ids_in_order_once_all_are_confirmed(
    rabbit, copier, probe, loop_publisher_closed
):
    ids = await copier.anotify_many([{"case_id": n, "src": "a", "dst": "b"} for n in range(20)])

    assert len(ids) == len(set(ids)) == 20
    messages = await asyncio.to_thread(wait_for_messages, rabbit, probe, 20)
    assert [p.message_id for p, _ in messages] == ids
    assert [json.loads(b)["case_id"] for _, b in messages] == list(range(20))


def test_publish_without_a_listener_class_sends_plain_json(unique, rabbit, probe):
    message_id = listener.publish(f"{unique}.key", {"any": ["json", 1, None]})

    properties, body = rabbit.wait_message(probe)
    assert properties.message_id == message_id
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert json.loads(body) == {"any": ["json", 1, None]}
    with pytest.raises(ValueError, match="wildcard"):
        listener.publish(f"{unique}.key.#", {})


async def test_apublish_without_a_listener_class_sends_plain_json(
    unique, rabbit, probe, loop_publisher_closed
):
    message_id = await listener.apublish(f"{unique}.key", [1, 2, 3])

    properties, body = await asyncio.to_thread(rabbit.wait_message, probe)
    assert properties.message_id == message_id
    assert json.loads(body) == [1, 2, 3]


def test_notify_from_eight_threads_at_once_delivers_every_message_with_a_unique_id(
    rabbit, copier, probe
):
    def send(thread: int) -> list[str]:
        return [copier.notify(case_id=thread * 100 + n, src="a", dst="b") for n in range(25)]

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = [i for batch in pool.map(send, range(8)) for i in batch]
    finally:
        default_publisher().close()  # the pool's threads are gone: close their connections

    assert len(ids) == len(set(ids)) == 200
    messages = wait_for_messages(rabbit, probe, 200)
    assert {p.message_id for p, _ in messages} == set(ids)
    assert sorted(json.loads(b)["case_id"] for _, b in messages) == sorted(
        t * 100 + n for t in range(8) for n in range(25)
    )
