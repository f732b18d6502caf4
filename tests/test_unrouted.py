"""Delayed messages that came due after their listener's queue was deleted: listed, kept while
their destination is still missing, and sent on once it exists (`amqp-listener delay`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from support.waiting import eventually

import listener
from listener import Listener, delay
from listener.runner.amqp_transport import Transport

CLI = str(Path(sys.executable).with_name("amqp-listener"))


class Job(BaseModel):
    n: int


def make(key: str, queue: str) -> type[Listener]:
    def handle(self: Any, message: Job) -> None: ...

    namespace = {"subscribes_to": key, "queue": queue, "handle": handle}
    return type(f"Gone{abs(hash(queue))}", (Listener,), namespace)


def cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args, "--url", url], capture_output=True, text=True, timeout=60, check=False
    )


async def declare(cls: type[Listener], settings: Any) -> None:
    transport = await Transport.connect(settings, name="test")
    try:
        await transport.declare(cls.topology(settings))
    finally:
        await transport.close()


async def strand(
    gone: type[Listener], rabbit: Any, settings: Any, send: Callable[[], Awaitable[str]]
) -> str:
    """Declare `gone`, `send` a delayed message for it, and delete its queue before the
    message is due: it lands in the unrouted queue. Returns its id."""
    rabbit.track(gone)
    await declare(gone, settings)
    rabbit.drain(delay.UNROUTED)  # leftovers of earlier runs: tests run one at a time
    message_id = await send()
    rabbit.delete_queue(gone.queue)  # before it is due: it finds no listener
    await eventually(lambda: rabbit.count(delay.UNROUTED) == 1, timeout=15)
    return message_id


# -- where a route leads ----------------------------------------------------------------------


def test_a_queue_route_leads_to_that_queue_on_the_default_exchange() -> None:
    headers = delay.route_headers(8, delay.target_key("orders.ship"))
    assert delay.routed_destination(headers) == ("", "orders.ship")


def test_an_address_route_leads_to_the_address_with_dots_kept_in_the_key() -> None:
    headers = delay.route_headers(8, delay.address_key("orders", "order.placed.eu"))
    assert delay.routed_destination(headers) == ("orders", "order.placed.eu")


def test_a_notify_route_is_read_from_the_keys_the_broker_recorded_when_it_dead_lettered() -> None:
    # A delayed notify() enters with its destination as the routing key and the bits in CC;
    # once dead-lettered, the broker lists both under x-death's routing-keys.
    bits = delay.bits_key(8)
    headers = {
        "CC": [bits],
        "x-death": [
            {"queue": delay.level_name(3), "routing-keys": [delay.target_key("a.b"), bits]}
        ],
    }
    assert delay.routed_destination(headers) == ("", "a.b")


@pytest.mark.parametrize(
    "headers",
    [None, {}, {"CC": "not a list"}, {"CC": [delay.bits_key(8)]}, {"CC": ["x.noroutingkey"]}],
)
def test_no_route_means_no_destination(headers: dict[str, Any] | None) -> None:
    assert delay.routed_destination(headers) is None


# -- on the broker ------------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_a_message_due_after_its_queue_was_deleted_is_listed_kept_then_sent_on(
    unique, rabbit, settings, amqp_url
):
    gone = make(f"{unique}.run", f"{unique}.gone")
    message_id = await strand(gone, rabbit, settings, lambda: gone.anotify(n=7, delay=0.5))

    listed = cli("delay", "list", "--json", url=amqp_url)
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert document["total"] == 1
    (entry,) = document["messages"]
    assert (entry["id"], entry["destination"]) == (message_id, gone.queue)
    assert entry["due_at"]
    assert rabbit.count(delay.UNROUTED) == 1  # listing removed nothing

    # Still nowhere to go: kept, exit 1, and the message is still there.
    kept = cli("delay", "replay", url=amqp_url)
    assert kept.returncode == 1, kept.stdout + kept.stderr
    assert "kept 1 message(s)" in kept.stdout
    assert message_id in kept.stdout
    await eventually(lambda: rabbit.count(delay.UNROUTED) == 1, timeout=10)

    await declare(gone, settings)  # the listener is back
    sent = cli("delay", "replay", "--json", url=amqp_url)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    report = json.loads(sent.stdout)
    assert [m["id"] for m in report["sent"]] == [message_id]
    assert report["kept"] == []

    properties, body = rabbit.wait_message(gone.queue)
    assert properties.message_id == message_id
    assert json.loads(body) == {"n": 7}
    assert delay.ROUTE_HEADER not in (properties.headers or {})  # due: no route left
    assert "x-death" not in (properties.headers or {})
    assert rabbit.count(delay.UNROUTED) == 0


@pytest.mark.rabbitmq
async def test_a_delayed_publish_to_an_address_is_sent_on_to_that_address(
    unique, rabbit, settings, amqp_url
):
    gone = make(f"{unique}.placed.eu", f"{unique}.addressed")
    message_id = await strand(
        gone,
        rabbit,
        settings,
        lambda: listener.apublish(f"{unique}.placed.eu", {"n": 3}, delay=0.5),
    )

    await declare(gone, settings)
    sent = cli("delay", "replay", url=amqp_url)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert f"{message_id} -> {unique}.placed.eu" in sent.stdout

    properties, body = rabbit.wait_message(gone.queue)
    assert (properties.message_id, json.loads(body)) == (message_id, {"n": 3})


@pytest.mark.rabbitmq
def test_nothing_unrouted_lists_zero_and_replays_nothing(amqp_url, rabbit):
    if rabbit.exists(delay.UNROUTED):  # absent until a runner declared the levels: also 0
        rabbit.drain(delay.UNROUTED)
    listed = cli("delay", "list", url=amqp_url)
    assert listed.returncode == 0, listed.stderr
    assert f"0 message(s) in {delay.UNROUTED}" in listed.stdout
    sent = cli("delay", "replay", url=amqp_url)
    assert sent.returncode == 0, sent.stderr
    assert "sent 0 message(s) on" in sent.stdout


def test_an_unreachable_broker_is_one_line_and_exit_1_without_the_password() -> None:
    result = cli("delay", "replay", url="amqp://guest:s3cret@127.0.0.1:1/%2F")
    assert result.returncode == 1
    assert "s3cret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
