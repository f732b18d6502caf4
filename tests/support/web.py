"""Helpers for the web console's tests: a declared listener with parked messages, and the
console app over it."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


class FakeManagement:
    """A stand-in for the RabbitMQ management API on a loopback port (the test broker has
    no management plugin): it answers with the counts set in `queues` and records every
    path it was asked for."""

    def __init__(self) -> None:
        self.queues: dict[str, dict] = {}
        self.asked: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.asked.append(self.path)
                path = urllib.parse.urlsplit(self.path).path
                parts = [urllib.parse.unquote(part) for part in path.split("/")[2:]]
                if parts == ["overview"]:
                    document: object = {"management_version": "stand-in"}
                elif parts[:1] == ["queues"] and len(parts) == 2:
                    document = [{"name": name, **record} for name, record in fake.queues.items()]
                elif parts[:1] == ["queues"] and len(parts) == 3 and parts[2] in fake.queues:
                    document = {"name": parts[2], **fake.queues[parts[2]]}
                else:
                    self.send_error(404)
                    return
                body = json.dumps(document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
