"""Sending on aio-pika's connection through its aiormq channel: the backend of
`AsyncPublisher` and of the outbox relay, and the property conversion the runner's moves use.

A publish goes straight to the aiormq channel under aio-pika's confirm channel, so no
aio-pika `Message` is built per message (a good part of a pipelined publish's cost). Every
client exception is translated here, at the boundary, into the PublishError family.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
from collections.abc import Sequence

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.abc

from listener import _nodes
from listener._amqp_errors import connect_error, publish_error
from listener._outgoing import Outgoing, Sending
from listener.errors import PublishError
from listener.settings import Settings

__all__ = [
    "AiormqBackend",
    "aiormq_properties",
    "connect_node",
    "connection_alive",
    "publish",
]


def aiormq_properties(message: Outgoing) -> aiormq.spec.Basic.Properties:
    """`message`'s properties in aiormq's (pamqp's) type."""
    timestamp = message.timestamp
    return aiormq.spec.Basic.Properties(
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=message.headers,
        delivery_mode=2 if message.persistent else 1,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id or None,
        timestamp=None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC),
        message_type=message.type,
        app_id=message.app_id,
    )


async def publish(
    channel: aiormq.abc.AbstractChannel,
    exchange: str,
    routing_key: str,
    message: Outgoing,
    *,
    timeout: float | None,
    named: tuple[str, str] | None = None,
) -> None:
    """Publish `message` mandatory on `channel` (opened with confirms and on_return_raises)
    and wait for its confirm, at most `timeout` seconds.

    Raises:
        PublishError: a subclass, naming `named` (or the exchange and routing key).
    """
    try:
        await channel.basic_publish(
            message.body,
            exchange=exchange,
            routing_key=routing_key,
            properties=aiormq_properties(message),
            mandatory=True,
            timeout=timeout,
        )
    except Exception as exc:
        exchange, routing_key = named or (exchange, routing_key)
        error = publish_error(
            exc, exchange=exchange, routing_key=routing_key, message_id=message.message_id
        )
        raise error from exc


class AiormqBackend:
    """One connection and confirm channel, opened on first use and again after a loss."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()

    def describe(self) -> str:
        """For the publisher's repr: the redacted URL and whether the channel is open."""
        state = "open" if self._channel is not None and not self._channel.is_closed else "closed"
        return f"url={self.settings.redacted_url!r} {state}"

    async def send(self, exchange: str, routing_key: str, message: Outgoing) -> None:
        """Publish one message and wait for its confirm (`confirm_timeout` at most)."""
        channel = await self.underlay()
        await publish(
            channel, exchange, routing_key, message, timeout=self.settings.confirm_timeout
        )

    async def send_batch(
        self, batch: Sequence[Sending], channel: aiormq.abc.AbstractChannel | None = None
    ) -> list[PublishError | None]:
        """Publish every message before waiting for any confirm; each one's error, or None
        when confirmed. One deadline, `confirm_timeout`, for all: the confirms of a
        pipelined batch are due together. A message not confirmed by then is a
        PublishTimeout (outcome unknown). On `channel` when given (from `underlay()`)."""
        if channel is None:
            channel = await self.underlay()
        sends = [
            asyncio.ensure_future(
                publish(channel, exchange, key, message, timeout=None, named=named)
            )
            for exchange, key, message, named in batch
        ]
        if not sends:
            return []
        _done, late = await asyncio.wait(sends, timeout=self.settings.confirm_timeout)
        for send in late:
            send.cancel()
        if late:
            await asyncio.wait(late)
        errors: list[PublishError | None] = []
        for send, (exchange, key, message, named) in zip(sends, batch, strict=True):
            # Every exception is retrieved, so that asyncio does not log it as lost.
            error = None if send.cancelled() else send.exception()
            if send in late:  # not confirmed in time: the outcome is unknown
                exchange, key = named or (exchange, key)
                error = publish_error(
                    TimeoutError(),
                    exchange=exchange,
                    routing_key=key,
                    message_id=message.message_id,
                )
            assert error is None or isinstance(error, PublishError), error
            errors.append(error)
        return errors

    async def reopen(self) -> None:
        """Open a new channel for the next publish. On RabbitMQ 3.10, a channel that first
        published just after a quorum leader's node died has every later publish nacked."""
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()

    async def aclose(self) -> None:
        """Close the connection; it is opened again if used again."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            await connection.close()

    async def underlay(self) -> aiormq.abc.AbstractChannel:
        """The confirm channel's aiormq channel, connecting first if need be.

        Raises:
            PublishUnreachable | PublishRefused: no connection could be opened.
        """
        channel = await self._open_channel()
        try:
            return await channel.get_underlay_channel()
        except Exception as exc:
            raise connect_error(exc, self.settings.redacted_url, publishing=True) from exc

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
    settings: Settings, node: _nodes.Node, name: str, *, heartbeat: int | None = None
) -> aio_pika.abc.AbstractConnection:
    """An aio-pika connection to one node (amqps: verified against the TLS settings), with
    `heartbeat` seconds (default: the setting)."""
    _nodes.check_login(settings, node)
    return await aio_pika.connect(
        node.aiormq_url,
        heartbeat=settings.heartbeat if heartbeat is None else heartbeat,
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
