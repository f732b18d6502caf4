"""The worker's side of the wire, on aio-pika: connect, declare, consume, move messages.

Every aio-pika/aiormq exception is translated here (through `listener._amqp_errors`), so
the consumer and the worker see only amqp-listener's own errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import aio_pika.abc

from listener._amqp_errors import connect_error, consume_error, declare_error, publish_error
from listener.apublisher import connection_alive
from listener.settings import Settings
from listener.topology import QueueSpec, Topology

__all__ = ["Subscription", "Transport"]

Callback = Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]]


class Subscription:
    """One queue being consumed on its own channel."""

    def __init__(
        self, channel: aio_pika.abc.AbstractChannel, queue: aio_pika.abc.AbstractQueue, tag: str
    ) -> None:
        self.channel = channel
        self.queue = queue
        self.tag = tag

    async def cancel(self) -> None:
        """Stop deliveries (basic.cancel); deliveries already received can still be acked."""
        if not self.channel.is_closed:
            await self.queue.cancel(self.tag)


class Transport:
    """One broker connection of a worker: a confirm channel for moves, a channel per consumer."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self._publish_channel: aio_pika.abc.AbstractChannel | None = None
        self._publish_lock = asyncio.Lock()

    @classmethod
    async def connect(cls, settings: Settings, *, name: str) -> Transport:
        """Open a connection, or raise BrokerUnreachable / AuthenticationFailed."""
        try:
            connection = await aio_pika.connect(
                settings.url.get_secret_value(),
                heartbeat=settings.heartbeat,
                timeout=settings.connect_timeout,
                client_properties={"connection_name": name},
            )
        except Exception as exc:
            raise connect_error(exc, settings.redacted_url) from exc
        return cls(connection, settings)

    @property
    def is_closed(self) -> bool:
        return not connection_alive(self.connection)

    async def declare(self, topology: Topology) -> None:
        """Declare the exchange, the queues and the binding (idempotent).

        Raises:
            TopologyMismatch: a queue exists with other arguments.
            BrokerError: any other refusal, translated.
        """
        async with self._scratch_channel() as channel:
            await channel.declare_exchange(
                topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            for spec in topology.queues:
                await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
            queue = await channel.get_queue(topology.queue.name, ensure=False)
            await queue.bind(topology.exchange, topology.binding_key)

    async def declare_queue(self, spec: QueueSpec) -> None:
        """Declare one queue (a delay queue first used by `Retry(delay=...)`)."""
        async with self._scratch_channel() as channel:
            await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)

    async def consume(self, queue_name: str, prefetch: int, callback: Callback) -> Subscription:
        """Start consuming `queue_name` with manual acks and per-consumer prefetch.

        Raises:
            BrokerError: the broker refused (an exclusive consumer holds the queue, ...).
        """
        try:
            channel = await self.connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.get_queue(queue_name, ensure=False)
            tag = await queue.consume(callback, no_ack=False)
        except Exception as exc:
            raise consume_error(exc, queue_name) from exc
        return Subscription(channel, queue, tag)

    @contextlib.asynccontextmanager
    async def _scratch_channel(self) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
        # A channel of its own: a refused declare closes the channel it was sent on.
        try:
            channel = await self.connection.channel(publisher_confirms=False)
        except Exception as exc:
            raise declare_error(exc) from exc
        try:
            yield channel
        except Exception as exc:
            raise declare_error(exc) from exc
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()

    async def publish_to_queue(self, queue_name: str, message: aio_pika.Message) -> None:
        """Publish to a queue by name, mandatory, and wait for the confirm.

        Raises:
            PublishError: a subclass; the caller must not ack the original.
        """
        try:
            channel = await self._confirm_channel()
            await channel.default_exchange.publish(
                message, queue_name, mandatory=True, timeout=self.settings.confirm_timeout
            )
        except Exception as exc:
            raise publish_error(
                exc, exchange="", routing_key=queue_name, message_id=str(message.message_id)
            ) from exc

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection; give up waiting after `timeout` (a peer that stopped
        answering must not hold the worker's exit)."""
        if not self.connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.connection.close(), timeout)

    def on_close(self, callback: Callable[[BaseException | None], Any]) -> None:
        """Call `callback(exc)` when the connection closes, for any reason."""
        self.connection.close_callbacks.add(lambda _conn, exc=None: callback(exc))

    async def _confirm_channel(self) -> aio_pika.abc.AbstractChannel:
        async with self._publish_lock:  # concurrent moves must share one channel, not race
            channel = self._publish_channel
            if channel is None or channel.is_closed or self.is_closed:
                channel = await self.connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._publish_channel = channel
            return channel
