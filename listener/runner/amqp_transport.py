"""The worker's side of the wire: connect, declare, consume, move messages.

Two connections per worker, one failure domain: deliveries arrive on a pika asyncio
connection (see `listener.runner.inbound` for why), while declares and the confirmed
publishes that move messages go through aio-pika. Losing either counts as losing the
broker. Every client exception is translated here (through `listener._amqp_errors`), so
the consumer and the worker see only amqp-listener's own errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aio_pika
import aio_pika.abc
import pika
import pika.channel
import pika.connection
from pika.adapters.asyncio_connection import AsyncioConnection

from listener import _nodes, _pika_internals
from listener import delay as _delay
from listener._aiormq_backend import connect_node, connection_alive, publish
from listener._amqp_errors import consume_error, declare_error, publish_error
from listener._outgoing import Outgoing
from listener.errors import PublishNacked
from listener.runner.inbound import Inbound, Subscription
from listener.settings import Settings
from listener.topology import Binding, QueueSpec, Topology

__all__ = ["Inbound", "Subscription", "Transport"]


#: Channels the delay levels are declared over, at once.
_DECLARING = 4


class Transport:
    """One broker connection of a worker: a confirm channel for moves, a channel per consumer."""

    def __init__(
        self,
        connection: aio_pika.abc.AbstractConnection,
        consuming: AsyncioConnection,
        settings: Settings,
        node: _nodes.Node,
    ) -> None:
        self.node = node  # the broker node both connections are open to
        self.connection = connection
        self.consuming = consuming
        self.settings = settings
        self.subscriptions: list[Subscription] = []
        self._close_callbacks: list[Callable[[BaseException | None], Any]] = []
        self._lost = False
        self._publish_channel: aio_pika.abc.AbstractChannel | None = None
        self._publish_lock = asyncio.Lock()
        self._levels_declared = False

    @classmethod
    async def connect(cls, settings: Settings, *, name: str) -> Transport:
        """Open both connections on one node of the list (the first of a shuffled list that
        answers), or raise BrokerUnreachable / AuthenticationFailed."""

        async def open_one(node: _nodes.Node) -> Transport:
            connection = await connect_node(settings, node, name)
            try:
                consuming = await _open_pika(settings, node, name)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), 5.0)
                raise
            return cls(connection, consuming, settings, node)

        transport = await _nodes.aconnect(settings, open_one, what=name)
        transport.connection.close_callbacks.add(lambda _conn, exc=None: transport._on_lost(exc))
        transport.consuming.add_on_close_callback(lambda _conn, exc: transport._on_lost(exc))
        return transport

    @property
    def is_closed(self) -> bool:
        return self._lost or not (connection_alive(self.connection) and self.consuming.is_open)

    async def declare(self, topology: Topology, *, again: bool = False) -> None:
        """Declare the exchange, the queues and the bindings (idempotent); the shared delay
        levels the first time on this connection, or `again`.

        Raises:
            TopologyMismatch: a queue exists with other arguments.
            BrokerError: any other refusal, translated.
        """
        if topology.levels and (again or not self._levels_declared):
            await self._declare_shared_levels(topology)
        async with self._scratch_channel() as channel:
            await channel.declare_exchange(
                topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            for spec in topology.queues:
                await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
            queue = await channel.get_queue(topology.queue.name, ensure=False)
            await queue.bind(topology.exchange, topology.binding_key)
            for binding in topology.delay_bindings:
                await _bind(channel, binding)

    async def _declare_shared_levels(self, topology: Topology) -> None:
        """The delay levels every listener shares: declared once per connection (each
        declaration is idempotent, but 26 quorum queues are not free to declare)."""
        async with self._scratch_channel() as channel:
            await channel.declare_exchange(
                _delay.UNROUTED, aio_pika.ExchangeType.FANOUT, durable=True
            )
            await channel.declare_exchange(
                _delay.OUT_EXCHANGE,
                aio_pika.ExchangeType.TOPIC,
                durable=True,
                arguments={"alternate-exchange": _delay.UNROUTED},
            )
            for name in topology.exchanges:
                if name != _delay.OUT_EXCHANGE:
                    await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        await self._declare_levels(topology.levels)
        async with self._scratch_channel() as channel:
            for binding in topology.level_bindings:
                await _bind(channel, binding)
        self._levels_declared = True

    async def _declare_levels(self, specs: Sequence[QueueSpec]) -> None:
        # Creating a quorum queue takes the broker a while, and a channel declares one queue
        # at a time: spread over a few channels, the 26 delay levels take half as long.
        async def declare(part: Sequence[QueueSpec]) -> None:
            async with self._scratch_channel() as channel:
                for spec in part:
                    await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)

        await asyncio.gather(*(declare(specs[i::_DECLARING]) for i in range(_DECLARING)))

    async def declare_queue(self, spec: QueueSpec) -> None:
        """Declare one queue (a delay queue first used by `Retry(delay=...)`)."""
        async with self._scratch_channel() as channel:
            await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)

    async def consume(
        self, queue_name: str, prefetch: int, callback: Callable[[Inbound], None]
    ) -> Subscription:
        """Consume `queue_name` on a channel of its own, manual acks, per-consumer prefetch.

        Raises:
            BrokerError: the broker refused (no such queue, an exclusive consumer holds it...).
        """
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[pika.channel.Channel] = loop.create_future()
        try:
            if not self.consuming.is_open:
                raise ConnectionError("the consuming connection is closed")
            channel = self.consuming.channel(on_open_callback=_resolver(opened))
            channel.add_on_close_callback(lambda _ch, reason: _fail(opened, reason))
            await opened
            subscription = Subscription(channel, queue_name, callback)
            qos: asyncio.Future[Any] = loop.create_future()
            channel.basic_qos(prefetch_count=prefetch, callback=_resolver(qos))
            subscription.on_closed(lambda exc: _fail(qos, exc))
            await qos
            await subscription.consume()
        except Exception as exc:
            raise consume_error(exc, queue_name) from exc
        self.subscriptions.append(subscription)
        subscription.on_closed(lambda _exc: self._forget(subscription))
        return subscription

    def _forget(self, subscription: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self.subscriptions.remove(subscription)

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

    async def publish_to_queue(self, queue_name: str, message: Outgoing) -> None:
        """Publish to a queue by name, mandatory, and wait for the confirm.

        Raises:
            PublishError: a subclass; the caller must not ack the original.
        """
        try:
            channel = await self._confirm_channel()
            underlay = await channel.get_underlay_channel()
        except Exception as exc:
            error = publish_error(
                exc, exchange="", routing_key=queue_name, message_id=message.message_id
            )
            raise error from exc
        try:
            await publish(underlay, "", queue_name, message, timeout=self.settings.confirm_timeout)
        except PublishNacked:
            self._publish_channel = None  # nacked channels stay nacked (see publisher.py)
            raise

    async def wait_sent(self, timeout: float = 1.0) -> None:
        """Send every ack marked so far, and wait (bounded) until the bytes left this process.

        pika buffers outgoing frames until the loop sees the socket writable; a process
        that dies before then takes its acks with it. A suspect message, about to run
        alone, calls this first, so that the messages settled before it are not delivered
        again if it kills the worker.
        """
        for subscription in list(self.subscriptions):
            subscription.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # pika signals nothing when its buffer empties: each turn of the loop lets its
        # writer run once.
        while _pika_internals.unsent_bytes(self.consuming) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0)

    async def close(self, timeout: float = 5.0) -> None:
        """Close both connections, together; past `timeout` drop them without the closing
        handshake (a peer that stopped answering must not hold the worker's exit, nor keep
        its sockets open)."""
        for subscription in list(self.subscriptions):
            subscription.flush()  # acks marked but not yet sent
        self._lost = True
        closing = [asyncio.ensure_future(_close_pika(self.consuming))]
        if not self.connection.is_closed:
            closing.append(asyncio.ensure_future(self.connection.close()))
        _done, pending = await asyncio.wait(closing, timeout=timeout)
        for task in pending:
            task.cancel()
        if not self.consuming.is_closed:
            _abort_pika(self.consuming)
        await asyncio.gather(*closing, return_exceptions=True)

    def on_close(self, callback: Callable[[BaseException | None], Any]) -> None:
        """Call `callback(exc)` once when the broker connection is lost, for any reason;
        soon, if it is lost already (a loss while the worker was still subscribing)."""
        if self._lost:
            asyncio.get_running_loop().call_soon(callback, None)
            return
        self._close_callbacks.append(callback)

    def _on_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        for callback in list(self._close_callbacks):
            callback(exc)

    async def _confirm_channel(self) -> aio_pika.abc.AbstractChannel:
        async with self._publish_lock:  # concurrent moves must share one channel, not race
            channel = self._publish_channel
            if channel is None or channel.is_closed or self.is_closed:
                channel = await self.connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._publish_channel = channel
            return channel


async def _bind(channel: aio_pika.abc.AbstractChannel, binding: Binding) -> None:
    if binding.to_exchange:
        destination = await channel.get_exchange(binding.destination, ensure=False)
        await destination.bind(binding.source, binding.key)
    else:
        queue = await channel.get_queue(binding.destination, ensure=False)
        await queue.bind(binding.source, binding.key)


async def _open_pika(settings: Settings, node: _nodes.Node, name: str) -> AsyncioConnection:
    """Open the consuming connection; its closing later is reported to the transport."""
    _pika_internals.install_field_decoder()
    loop = asyncio.get_running_loop()
    parameters = _nodes.pika_parameters(settings, node, f"{name} (deliveries)")
    opened: asyncio.Future[None] = loop.create_future()

    def on_open(_conn: pika.connection.Connection) -> None:
        if not opened.done():
            opened.set_result(None)

    def on_open_error(_conn: AsyncioConnection, exc: str | Exception) -> None:
        _fail(opened, exc if isinstance(exc, Exception) else ConnectionError(exc))

    connection = AsyncioConnection(
        parameters,
        on_open_callback=on_open,
        on_open_error_callback=on_open_error,
        custom_ioloop=loop,
    )
    try:
        await opened
    except BaseException:
        await _close_pika(connection)
        raise
    return connection


async def _close_pika(connection: AsyncioConnection) -> None:
    if connection.is_closed:
        return
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()
    connection.add_on_close_callback(lambda _conn, _exc: _resolver(closed)(None))
    if not connection.is_closing:
        with contextlib.suppress(Exception):
            connection.close()
    await closed


def _abort_pika(connection: AsyncioConnection) -> None:
    """Drop the socket at once."""
    _pika_internals.abort(connection)


def _resolver(future: asyncio.Future[Any]) -> Callable[[Any], None]:
    def resolve(value: Any) -> None:
        if not future.done():
            future.set_result(value)

    return resolve


def _fail(future: asyncio.Future[Any], exc: BaseException | None) -> None:
    if not future.done():
        future.set_exception(exc or ConnectionError("the channel closed"))
