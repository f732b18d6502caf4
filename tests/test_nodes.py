"""A list of broker URLs: parsed and checked one by one, every password redacted, and
connections that fail over to the next node, on both clients."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from support.proxy import TcpProxy

from listener import _nodes
from listener.apublisher import AsyncPublisher
from listener.errors import (
    AuthenticationFailed,
    ConfigurationError,
    PublishConnectionLost,
    PublishUnreachable,
)
from listener.operations import Operator
from listener.publisher import Publisher
from listener.runner.amqp_transport import Transport
from listener.settings import Settings, get_settings, redact_url

SECRET_1 = "first-s3cr3t"
SECRET_2 = "second-s3cr3t"


def _dead_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def dead_url() -> str:
    return f"amqp://guest:{SECRET_2}@127.0.0.1:{_dead_port()}/%2F"


@pytest.fixture
def exchange(rabbit, unique) -> str:
    """An exchange with a queue `<exchange>.q` bound on `key`, deleted after the test."""
    rabbit.declare_exchange(unique)
    rabbit.declare_queue(f"{unique}.q", bind=(unique, "key"))
    return unique


# -- failures first --------------------------------------------------------------------------


def test_no_password_of_a_list_reaches_the_error_about_its_second_url(monkeypatch):
    monkeypatch.setenv("AMQP_URL", f"amqp://u:{SECRET_1}@a/,http://u:{SECRET_2}@b/")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError) as caught:
            get_settings()
    finally:
        get_settings.cache_clear()
    text = f"{caught.value} {caught.value!r}"
    assert SECRET_1 not in text
    assert SECRET_2 not in text
    assert "URL 2 of 2" in text  # says which one to fix


def test_an_empty_entry_in_a_list_is_refused():
    with pytest.raises(ConfigurationError, match="empty"):
        Settings().with_url(f"amqp://u:{SECRET_1}@a/,,amqp://b/")


def test_every_password_of_a_list_is_redacted():
    settings = Settings(url=f"amqp://u:{SECRET_1}@a:5672/%2F, amqps://v:{SECRET_2}@b/x")
    shown = f"{settings.redacted_url} {settings!r} {Publisher(settings)!r}"
    assert SECRET_1 not in shown
    assert SECRET_2 not in shown
    assert settings.redacted_url == "amqp://u:***@a:5672/%2F, amqps://v:***@b/x"
    assert redact_url(f"amqp://u:{SECRET_1}@a/,amqp://u:{SECRET_2}@b/") == (
        "amqp://u:***@a/, amqp://u:***@b/"
    )


def test_a_publisher_fails_with_every_node_named_and_no_password(dead_url):
    other = dead_url.replace(SECRET_2, SECRET_1).rsplit(":", 1)[0] + f":{_dead_port()}/%2F"
    publisher = Publisher(Settings(url=f"{dead_url},{other}", connect_timeout=2))
    with pytest.raises(PublishUnreachable) as caught:
        publisher.publish("nowhere.key", {"n": 1})
    text = str(caught.value)
    assert SECRET_1 not in text and SECRET_2 not in text
    assert "none of the 2 broker nodes answered" in text
    assert text.count("127.0.0.1:") == 2


def test_a_refused_login_is_not_retried_on_the_other_nodes(amqp_url, dead_url):
    refused = amqp_url.replace("guest:guest@", f"guest:{SECRET_1}@")
    settings = Settings(url=f"{refused},{refused}", connect_timeout=2)
    with pytest.raises(AuthenticationFailed) as caught:
        asyncio.run(Transport.connect(settings, name="test refused"))
    assert SECRET_1 not in str(caught.value)
    assert "none of" not in str(caught.value)


# -- success paths ---------------------------------------------------------------------------


def test_the_order_of_the_nodes_is_shuffled_per_connection():
    settings = Settings(url=",".join(f"amqp://h{n}/" for n in range(6)))
    orders = {tuple(node.host for node in _nodes.in_turn(settings)) for _ in range(50)}
    assert len(orders) > 1
    assert all(sorted(order) == [f"h{n}" for n in range(6)] for order in orders)


def test_notify_fails_over_to_a_node_that_answers_and_logs_which(
    amqp_url, dead_url, exchange, rabbit, caplog
):
    publisher = Publisher(Settings(url=f"{dead_url},{amqp_url}", connect_timeout=2))
    with caplog.at_level(logging.INFO, logger="listener.nodes"):
        for _ in range(4):  # shuffled: some of these try the dead node first
            publisher.publish(f"{exchange}.key", {"n": 1})
            publisher.close()
    assert "connected to amqp://guest:***@127.0.0.1:5672/%2F" in caplog.text
    assert SECRET_2 not in caplog.text
    assert len(rabbit.drain(f"{exchange}.q")) == 4


def test_async_publishing_fails_over_too(amqp_url, dead_url, exchange, rabbit):

    async def publish_twice() -> None:
        publisher = AsyncPublisher(Settings(url=f"{dead_url},{amqp_url}", connect_timeout=2))
        for _ in range(2):
            await publisher.publish(f"{exchange}.key", {"n": 1})
            await publisher.aclose()
        await publisher.publish_bodies(exchange, "key", [b"{}"] * 3)
        await publisher.aclose()

    asyncio.run(publish_twice())
    assert len(rabbit.drain(f"{exchange}.q")) == 5


def test_a_worker_transport_opens_both_connections_on_one_node_that_answers(amqp_url, dead_url):
    async def connect() -> tuple[str, str]:
        transport = await Transport.connect(
            Settings(url=f"{dead_url},{amqp_url},{dead_url}", connect_timeout=2),
            name="test failover",
        )
        try:
            return transport.node.redacted, str(transport.consuming.params.port)
        finally:
            await transport.close()

    node, pika_port = asyncio.run(connect())
    assert node == "amqp://guest:***@127.0.0.1:5672/%2F"
    assert pika_port == "5672"


def test_a_publish_whose_node_dies_before_the_confirm_is_outcome_unknown_and_the_next_fails_over(
    exchange, rabbit
):
    with TcpProxy() as first, TcpProxy() as second:
        urls = [f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F" for proxy in (first, second)]
        publisher = Publisher(Settings(url=",".join(urls), connect_timeout=2))
        publisher.publish(f"{exchange}.key", {"n": 1})
        used, other = (first, second) if first.open_connections else (second, first)
        # The node "dies": its connection resets at the next frame, and it refuses new ones.
        used.cut_after(8)

        with pytest.raises(PublishConnectionLost, match="Outcome unknown") as caught:
            publisher.publish(f"{exchange}.key", {"n": 2})
        assert caught.value.message_id  # the id to look for, to know what became of it

        publisher.publish(f"{exchange}.key", {"n": 3})  # not an error: the other node
        assert other.open_connections == 1
        publisher.close()
    bodies = [body for _properties, body in rabbit.drain(f"{exchange}.q")]
    assert bodies == [b'{"n":1}', b'{"n":3}']  # this cut fell before the broker saw it


def test_an_operator_command_connects_through_a_node_that_answers(
    amqp_url, dead_url, exchange, rabbit
):
    rabbit.declare_queue(f"{exchange}.q.dead")
    settings = Settings(url=f"{dead_url},{amqp_url},{dead_url}", connect_timeout=2)
    for _ in range(3):  # shuffled: some of these try a dead node first
        with Operator(settings) as operator:
            assert operator.parked(operator.target(f"{exchange}.q")) == []
