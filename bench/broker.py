"""The parent's view of the broker (pika): declare, pre-fill, count, delete.

Everything declared is remembered until deleted, so that `delete_all()` (run on Ctrl-C, on a
timed-out case and at the end) leaves nothing named `bench-...` behind.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pika.spec

from bench.wire import CONTENT_TYPE
from listener import delay as _delay
from listener.settings import split_urls
from listener.topology import Binding, Topology

__all__ = ["Broker"]

_BLOCKED_TIMEOUT = 30.0


class Broker:
    """One blocking pika connection, reopened when a refusal closed its channel."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._exchanges: set[str] = set()
        self._queues: set[str] = set()
        self._entries: list[Binding] = []  # keys bound from the delay entry to the top level

    def _ch(self) -> Any:
        if self._connection is None or not self._connection.is_open:
            # A list of URLs (a cluster's nodes): pika tries them in turn.
            candidates = [pika.URLParameters(one) for one in split_urls(self.url)]
            for parameters in candidates:
                # A broker that blocks publishers (a memory or disk alarm) fails the pre-fill
                # instead of hanging it: pika would wait for ever.
                parameters.blocked_connection_timeout = _BLOCKED_TIMEOUT
            self._connection = pika.BlockingConnection(candidates)
            self._channel = None
        if self._channel is None or not self._channel.is_open:
            self._channel = self._connection.channel()
        return self._channel

    def server_version(self) -> str:
        """The broker's version, as it announced itself (raises if it cannot be reached)."""
        self._ch()
        # pika keeps the server's properties on the connection underneath, nowhere public.
        properties = self._connection._impl.server_properties  # type: ignore[union-attr]
        version = properties.get("version", b"unknown")
        return version.decode() if isinstance(version, bytes) else str(version)

    def declare(self, topology: Topology) -> None:
        """Declare the exchange, every queue with the framework's arguments, the binding,
        and the listener's way into and out of the shared delay levels (declared too, as
        `amqp-listener run` does; they are shared, so they stay)."""
        self._exchanges.add(topology.exchange)
        self._queues.update(spec.name for spec in topology.queues)
        channel = self._ch()
        channel.exchange_declare(topology.exchange, "topic", durable=True)
        for spec in topology.queues:
            channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
        channel.queue_bind(topology.queue.name, topology.exchange, topology.binding_key)
        self._declare_levels(topology)
        for binding in topology.delay_bindings:
            if binding.to_exchange:
                channel.exchange_bind(binding.destination, binding.source, binding.key)
                self._entries.append(binding)
            else:
                channel.queue_bind(binding.destination, binding.source, binding.key)

    def _declare_levels(self, topology: Topology) -> None:
        channel = self._ch()
        channel.exchange_declare(_delay.UNROUTED, "fanout", durable=True)
        channel.exchange_declare(
            _delay.OUT_EXCHANGE,
            "topic",
            durable=True,
            arguments={"alternate-exchange": _delay.UNROUTED},
        )
        for name in topology.exchanges:
            if name != _delay.OUT_EXCHANGE:
                channel.exchange_declare(name, "topic", durable=True)
        for spec in topology.levels:
            channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
        for binding in topology.level_bindings:
            if binding.to_exchange:
                channel.exchange_bind(binding.destination, binding.source, binding.key)
            else:
                channel.queue_bind(binding.destination, binding.source, binding.key)

    def prefill(
        self,
        exchange: str,
        routing_key: str,
        count: int,
        value: Callable[[int], dict[str, Any]],
        queue: str,
        timeout: float,
    ) -> None:
        """Publish `count` persistent messages (not timed, so without confirms) and wait
        until `queue` holds all of them."""
        channel = self._ch()
        for n in range(count):
            properties = pika.BasicProperties(
                content_type=CONTENT_TYPE,
                delivery_mode=pika.spec.PERSISTENT_DELIVERY_MODE,
                message_id=uuid.uuid4().hex,
                timestamp=int(time.time()),
            )
            body = json.dumps(value(n), separators=(",", ":")).encode()
            channel.basic_publish(exchange, routing_key, body, properties)
        self.wait_messages(queue, count, timeout)

    def publish_probe(self, exchange: str, routing_key: str, n: int) -> None:
        """Publish latency probe `n`, stamped with `time.monotonic()` just before it goes."""
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=pika.spec.PERSISTENT_DELIVERY_MODE
        )
        body = json.dumps({"n": n, "t": time.monotonic()}, separators=(",", ":")).encode()
        self._ch().basic_publish(exchange, routing_key, body, properties)

    def counts(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of `queue`, by a passive declare."""
        method = self._ch().queue_declare(queue, passive=True).method
        return int(method.message_count), int(method.consumer_count)

    def wait_messages(self, queue: str, expected: int, timeout: float) -> None:
        """Wait until `queue` holds exactly `expected` ready messages (TimeoutError)."""
        deadline = time.monotonic() + timeout
        while (found := self.counts(queue)[0]) != expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {queue} holds {found} messages, expected {expected}")
            time.sleep(0.02)

    def adopt(self, queues: list[str]) -> None:
        """Remember queues a measured process declares itself, so that they are deleted too."""
        self._queues.update(queues)

    def delete_queues(self, queues: list[str]) -> None:
        """Delete `queues` (a peer's own, see `adopt`)."""
        for name in queues:
            self._delete_queue(name)

    def delete(self, topology: Topology) -> None:
        """Delete the queues and the exchange of `topology`, and unbind its keys from the
        delay entry (the shared delay levels stay)."""
        for name in (spec.name for spec in topology.queues):
            self._delete_queue(name)
        self._delete_exchange(topology.exchange)
        self._unbind_entries()

    def delete_all(self) -> None:
        """Delete everything declared and not deleted yet, on a fresh connection."""
        self.close()
        for name in sorted(self._queues):
            self._delete_queue(name)
        for name in sorted(self._exchanges):
            self._delete_exchange(name)
        self._unbind_entries()
        self.close()

    def _unbind_entries(self) -> None:
        while self._entries:
            binding = self._entries.pop()
            with contextlib.suppress(Exception):
                self._ch().exchange_unbind(binding.destination, binding.source, binding.key)

    def _delete_queue(self, name: str) -> None:
        with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):  # already gone
            self._ch().queue_delete(name)
        self._queues.discard(name)

    def _delete_exchange(self, name: str) -> None:
        with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
            self._ch().exchange_delete(name)
        self._exchanges.discard(name)

    def leftovers(self) -> list[str]:
        """What was declared and not deleted yet."""
        return sorted(self._queues | self._exchanges)

    def close(self) -> None:
        """Close the connection (a Ctrl-C may have left it mid-frame)."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            # Broken by an interruption, it cannot close politely: dropping it is all left.
            with contextlib.suppress(Exception):
                connection.close()
