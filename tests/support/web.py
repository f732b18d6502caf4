"""Helpers for the web console's tests: a declared listener with parked messages, and the
console app over it."""

from __future__ import annotations

import re
import time
import uuid

import pika

from listener import Listener
from listener._web_data import BrokerSource, JobSource, NoLedger
from listener._web_security import Credentials
from listener.settings import Settings
from listener.web import Console, create_app

NO_LEDGER = NoLedger("This page needs the job ledger: set AMQP_LISTENER_DATABASE_URL.")


def declared_listener(unique: str, rabbit) -> type[Listener]:
    """A listener whose whole topology exists on the broker (and is deleted after the test)."""

    class Mailer(Listener):
        subscribes_to = f"{unique}.send"
        queue = f"{unique}.mailer"
        retry_delays = (1,)

        def handle(self, message: dict) -> None: ...

    topology = Mailer.topology()
    rabbit.declare_exchange(topology.exchange)
    for spec in topology.queues:
        rabbit.declare_queue(spec.name, **spec.arguments)
    rabbit._ch().queue_bind(topology.queue.name, topology.exchange, topology.binding_key)
    rabbit.track(Mailer)
    return Mailer


def park(rabbit, cls: type[Listener], count: int = 1, *, body: bytes = b'{"to": "a@b.c"}'):
    """Park `count` messages as the runner would (failure headers); returns their ids."""
    ids = []
    for n in range(count):
        message_id = f"parked-{n}-{uuid.uuid4().hex[:6]}"
        headers = {
            "x-parked-reason": "failed",
            "x-attempts": 3,
            "x-exception-type": "SMTPError",
            "x-exception-message": f"the mail server said no ({n})",
            "x-exception-traceback": "Traceback (most recent call last):\n  ...\nSMTPError",
            "x-last-failure-at": f"2026-01-01T00:00:{n:02d}.000+00:00",
            "x-listener": cls.name(),
        }
        rabbit.publish(
            "",
            f"{cls.queue}.dead",
            body,
            message_id=message_id,
            delivery_mode=2,
            headers=headers,
            content_type="application/json",
        )
        ids.append(message_id)
    deadline = time.monotonic() + 10
    while rabbit.count(f"{cls.queue}.dead") < count:
        assert time.monotonic() < deadline, "the parked messages never arrived"
        time.sleep(0.02)
    return ids


def console_app(
    settings: Settings,
    cls: type[Listener],
    *,
    read_only: bool = False,
    show_bodies: bool = False,
    credentials: Credentials | None = None,
    ttl: float = 5.0,
    jobs: JobSource = NO_LEDGER,
):
    broker = BrokerSource(settings, [cls], ttl=ttl)
    return create_app(Console(broker, jobs, read_only, show_bodies), credentials), broker


def csrf_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert match, "the page carries no CSRF token"
    return match.group(1)


def basic_properties(message_id: str) -> pika.BasicProperties:
    return pika.BasicProperties(message_id=message_id, delivery_mode=2)
