"""Asynchronous, confirmed publishing on aio-pika: `anotify()`, `apublish()` and batches.

Each event loop gets its own connection. A batch sends every message before waiting, so
the confirms are pipelined: the batch costs about one round trip, not one per message.
The synchronous `notify_many()` runs a batch on a private event loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.abc

from listener import _nodes, _redirect, codec, routing
from listener import delay as _delay
from listener._amqp_errors import connect_error, publish_error
from listener._loop import loop_factory
from listener.errors import PublishNacked
from listener.settings import Settings, get_settings
from listener.tracing import inject_trace_context

__all__ = [
    "AsyncPublisher",
    "apublish",
    "connect_node",
    "connection_alive",
    "default_async_publisher",
    "run_in_background",
]

T = TypeVar("T")

#: The most messages of a batch awaiting their confirms at once.
_WINDOW = 1000


class AsyncPublisher:
    """Publishes with confirms on one asyncio event loop.

    Example:
        publisher = AsyncPublisher()
        await publisher.publish("case_files.copy_requested", {"case_id": 1})
        await publisher.aclose()
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._published = 0

    def __repr__(self) -> str:
        state = "open" if self._channel is not None and not self._channel.is_closed else "closed"
        url = self.settings.redacted_url
        return f"<AsyncPublisher url={url!r} {state} published={self._published}>"

    async def publish(
        self,
        address: str,
        value: Any,
        *,
        headers: dict[str, Any] | None = None,
        delay: float | dt.timedelta | None = None,
        at: dt.datetime | None = None,
    ) -> str:
        """Publish `value` as JSON to `"exchange.routing_key"`; returns the message id once
        confirmed. With `delay=` seconds or `at=` an aware datetime, it reaches every
        listener bound there at that moment (see `listener.delay`)."""
        exchange, key = routing.parse_address(address, wildcards=False)
        seconds = _delay.seconds_until(delay=delay, at=at)
        exchange, key, headers = _delay.address_route(exchange, key, headers, seconds)
        return await self.publish_body(exchange, key, codec.encode(value), headers=headers)

    async def publish_body(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """Publish an encoded body and wait for its confirm."""
        codec.check_size(body, self.settings.max_body_bytes)
        channel = await self._underlay()
        try:
            return await self._send(
                channel,
                exchange,
                routing_key,
                body,
                headers,
                codec.new_message_id(),
                self.settings.confirm_timeout,
            )
        except PublishNacked:
            await self._reopen_channel()
            raise

    async def publish_bodies(
        self,
        exchange: str,
        routing_key: str,
        bodies: Sequence[bytes],
        *,
        headers: dict[str, Any] | None = None,
    ) -> list[str]:
        """Publish a batch with pipelined confirms, each with `headers`; returns the ids in
        order.

        Raises:
            PublishError: the first failure, once every confirm is in (the others that were
                confirmed stay published).
        """
        for body in bodies:  # all or nothing: refuse the batch before the first send
            codec.check_size(body, self.settings.max_body_bytes)
        target = await self._underlay()
        ids: list[str] = []
        first_error: BaseException | None = None
        # In windows, so that a huge batch does not hold every unconfirmed message at once.
        for start in range(0, len(bodies), _WINDOW):
            window = bodies[start : start + _WINDOW]
            window_ids = [codec.new_message_id() for _ in window]
            ids += window_ids
            sends = [
                asyncio.ensure_future(
                    self._send(
                        target,
                        exchange,
                        routing_key,
                        body,
                        dict(headers) if headers else None,
                        message_id,
                        None,
                    )
                )
                for body, message_id in zip(window, window_ids, strict=True)
            ]
            # One deadline for the window rather than one timer per message: the confirms
            # of a window are pipelined, so they are due together.
            _done, late = await asyncio.wait(sends, timeout=self.settings.confirm_timeout)
            for send in late:
                send.cancel()
            if late:
                await asyncio.wait(late)
            for send, message_id in zip(sends, window_ids, strict=True):
                # Every exception is retrieved, so that asyncio does not log it as lost.
                error = None if send.cancelled() else send.exception()
                if send in late:  # not confirmed in time: the outcome is unknown
                    error = publish_error(
                        TimeoutError(),
                        exchange=exchange,
                        routing_key=routing_key,
                        message_id=message_id,
                    )
                first_error = first_error or error
        if first_error is not None:
            if isinstance(first_error, PublishNacked):
                await self._reopen_channel()
            raise first_error
        return ids

    async def aclose(self) -> None:
        """Close the connection; the publisher re-opens it if used again."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            await connection.close()

    async def _reopen_channel(self) -> None:
        """Open a new channel for the next publish. On RabbitMQ 3.10, a channel that first
        published just after a quorum leader's node died has every later publish nacked."""
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _underlay(self) -> aiormq.abc.AbstractChannel:
        """The confirm channel's aiormq channel, which publishes without building an
        aio-pika `Message` per message (a good part of a pipelined publish's cost)."""
        channel = await self._open_channel()
        try:
            return await channel.get_underlay_channel()
        except Exception as exc:
            raise connect_error(exc, self.settings.redacted_url, publishing=True) from exc

    async def _send(
        self,
        channel: aiormq.abc.AbstractChannel,
        exchange_name: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None,
        message_id: str,
        timeout: float | None,
    ) -> str:
        properties = aiormq.spec.Basic.Properties(
            content_type=codec.CONTENT_TYPE,
            delivery_mode=2,  # persistent
            message_id=message_id,
            timestamp=dt.datetime.now(dt.UTC),
            headers=inject_trace_context(headers),
        )
        try:
            # The channel was opened with on_return_raises: an unroutable message raises.
            await channel.basic_publish(
                body,
                exchange=exchange_name,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                timeout=timeout,
            )
        except Exception as exc:
            error = publish_error(
                exc, exchange=exchange_name, routing_key=routing_key, message_id=message_id
            )
            raise error from exc
        self._published += 1
        return message_id

    async def _open_channel(self) -> aio_pika.abc.AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed and connection_alive(self._connection):
            return channel
        async with self._lock:
            if (
                self._channel is not None
                and not self._channel.is_closed
                and connection_alive(self._connection)
            ):
                return self._channel
            if not connection_alive(self._connection):
                if self._connection is not None:
                    with contextlib.suppress(Exception):
                        await self._connection.close()
                self._connection = await _nodes.aconnect(
                    self.settings,
                    lambda node: connect_node(
                        self.settings, node, f"amqp-listener publisher pid={os.getpid()}"
                    ),
                    what="publisher",
                    publishing=True,
                )
            assert self._connection is not None
            try:
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            except Exception as exc:
                # The connection died between the check and the channel: nothing was sent.
                raise connect_error(exc, self.settings.redacted_url, publishing=True) from exc
            return self._channel


async def connect_node(
    settings: Settings, node: _nodes.Node, name: str
) -> aio_pika.abc.AbstractConnection:
    """An aio-pika connection to one node (amqps: verified against the TLS settings)."""
    return await aio_pika.connect(
        node.url,
        heartbeat=settings.heartbeat,
        timeout=settings.connect_timeout,
        ssl_context=_nodes.ssl_context(settings) if node.tls else None,
        client_properties={"connection_name": name},
    )


def connection_alive(connection: aio_pika.abc.AbstractConnection | None) -> bool:
    """Whether `connection` can still carry frames.

    aio-pika's `is_closed` turns true only after an explicit close(); a connection lost to
    the network or closed by the broker shows only in `connected` being cleared.
    """
    if connection is None or connection.is_closed:
        return False
    connected = getattr(connection, "connected", None)
    return connected is None or bool(connected.is_set())


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncPublisher] = (
    weakref.WeakKeyDictionary()
)


def default_async_publisher() -> AsyncPublisher:
    """The running event loop's publisher behind `anotify()` and `apublish()` (while a
    `listener.testing.MemoryBroker` is active, that broker's)."""
    redirect = _redirect.active
    if redirect is not None:
        return redirect.async_publisher
    loop = asyncio.get_running_loop()
    publisher = _per_loop.get(loop)
    if publisher is None:
        publisher = _per_loop[loop] = AsyncPublisher()
    return publisher


async def apublish(
    address: str,
    value: Any,
    *,
    headers: dict[str, Any] | None = None,
    session: Any = None,
    ordering_key: str | None = None,
    delay: float | dt.timedelta | None = None,
    at: dt.datetime | None = None,
) -> str:
    """The asyncio twin of `listener.publish()`; `session` is an `AsyncSession` (or a
    `Session`)."""
    if session is not None or ordering_key is not None:
        from listener import outbox

        exchange, key = routing.parse_address(address, wildcards=False)
        body = codec.encode(value)
        headers = _delay.due_headers(headers, delay=delay, at=at)
        ids = await outbox.awrite(
            session, exchange, key, [body], headers=headers, ordering_key=ordering_key
        )
        return ids[0]
    publisher = default_async_publisher()
    return await publisher.publish(address, value, headers=headers, delay=delay, at=at)


class _BackgroundLoop:
    """An event loop in a daemon thread, so synchronous code can run batches on it."""

    def __init__(self) -> None:
        self.loop = loop_factory(get_settings().event_loop)()
        self.publisher: AsyncPublisher | None = None
        thread = threading.Thread(
            target=self.loop.run_forever, name="amqp-listener-publisher", daemon=True
        )
        thread.start()


_background: _BackgroundLoop | None = None
_background_lock = threading.Lock()


def run_in_background(work: Callable[[AsyncPublisher], Awaitable[T]]) -> T:
    """Run `work(publisher)` on the background loop and wait for its result (thread-safe).

    While a `listener.testing.MemoryBroker` is active, `work` runs against that broker.
    """
    redirect = _redirect.active
    if redirect is not None:
        return redirect.run_batch(work)
    global _background
    with _background_lock:
        if _background is None:
            _background = _BackgroundLoop()
        background = _background

    async def call() -> T:
        if background.publisher is None:
            background.publisher = AsyncPublisher()
        return await work(background.publisher)

    return asyncio.run_coroutine_threadsafe(call(), background.loop).result()


def _forget_after_fork() -> None:
    global _background, _background_lock
    _background = None
    _background_lock = threading.Lock()
    _per_loop.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
