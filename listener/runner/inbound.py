"""The consuming side of the wire: a queue consumed on a pika channel, and its deliveries.

Deliveries arrive on a `pika` asyncio connection rather than through aio-pika: pika parses
every frame a socket read brings in one pass, where aio-pika awaits each frame part, and
that is most of the cost of a consumed message. Everything else in the worker (declares,
the confirmed publishes that move messages) stays on aio-pika.

Acks are batched, exactly: `Inbound.ack()` only marks a delivery settled, and once per loop
iteration `Subscription` acks the longest run of settled deliveries at the head of the
channel's outstanding ones with a single `basic.ack(multiple=True)`. A delivery whose
handler has not returned is never covered by it; settled deliveries behind one still
running are acked one by one, so a slow handler does not hold back the acks of the rest.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Mapping
from typing import Any

import pika.channel
import pika.exceptions
import pika.spec

from listener import _pika_internals

__all__ = ["Inbound", "Subscription"]


class Subscription:
    """One queue consumed on its own pika channel, with manual, batched acks."""

    def __init__(
        self, channel: pika.channel.Channel, queue: str, on_message: Callable[[Inbound], None]
    ) -> None:
        self.channel = channel
        self.queue = queue
        self.tag: str | None = None
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()
        #: Outstanding delivery tags in arrival order -> settled (ack wanted) or not.
        self._outstanding: dict[int, bool] = {}
        self._flush_scheduled = False
        self._closed_callbacks: list[Callable[[BaseException | None], Any]] = []
        self._cancelled_callbacks: list[Callable[[], Any]] = []
        self._pending: set[asyncio.Future[Any]] = set()
        self.close_reason: BaseException | None = None
        channel.add_on_close_callback(self._closed)
        channel.add_on_cancel_callback(self._cancelled_by_broker)

    def __repr__(self) -> str:
        return (
            f"<Subscription {self.queue} tag={self.tag} outstanding={len(self._outstanding)} "
            f"closed={self.is_closed}>"
        )

    @property
    def is_closed(self) -> bool:
        return not self.channel.is_open

    # -- consuming --------------------------------------------------------------------------

    async def consume(self) -> None:
        """basic.consume (again, after a cancel: the channel and its unacked deliveries stay)."""
        future = self._future()
        self.tag = self.channel.basic_consume(
            self.queue, self._deliver, auto_ack=False, callback=lambda _frame: _set(future)
        )
        await future

    async def cancel(self) -> None:
        """basic.cancel: no new deliveries; the ones received can still be acked."""
        if self.is_closed or self.tag is None:
            return
        future = self._future()
        tag, self.tag = self.tag, None
        self.channel.basic_cancel(tag, callback=lambda _frame: _set(future))
        # Deliveries the broker sent before it saw the cancel still arrive until Cancel-Ok.
        # pika would reject them with requeue, and RabbitMQ counts a requeue as a delivery
        # without an outcome (`x-delivery-count`). They go to the consumer instead, which
        # hands them back uncounted.
        _pika_internals.forget_cancelling(self.channel, tag)
        await future

    async def close(self) -> None:
        self.flush()
        if self.is_closed:
            return
        # Not through _future(): the close itself fails the futures waiting on the channel.
        future: asyncio.Future[Any] = self._loop.create_future()
        self._closed_callbacks.append(lambda _exc: _set(future))
        if self.channel.is_open:
            self.channel.close()
        await future

    def on_closed(self, callback: Callable[[BaseException | None], Any]) -> None:
        """Call `callback(reason)` when the channel closes, for any reason."""
        self._closed_callbacks.append(callback)

    def on_cancelled(self, callback: Callable[[], Any]) -> None:
        """Call `callback()` when the broker cancels the consumer (its queue went away)."""
        self._cancelled_callbacks.append(callback)

    def _deliver(
        self,
        _channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        assert method.delivery_tag is not None
        self._outstanding[method.delivery_tag] = False
        self._on_message(Inbound(self, method, properties, body))

    # -- settling ---------------------------------------------------------------------------

    def ack(self, tag: int) -> bool:
        """Mark `tag` settled; it is acked before the loop next waits for I/O."""
        if self._outstanding.get(tag) is not False:
            return False  # settled already, or its channel is gone
        self._outstanding[tag] = True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)
        return True

    def nack(self, tag: int, *, requeue: bool) -> bool:
        """Return `tag` to the broker; False (and nothing sent) when it was settled already
        or its channel is gone."""
        if self._outstanding.get(tag) is not False or self.is_closed:
            return False
        del self._outstanding[tag]
        self.channel.basic_nack(tag, multiple=False, requeue=requeue)
        return True

    def outstanding(self, tag: int) -> bool:
        """Whether `tag` is delivered and neither settled nor returned yet."""
        return self._outstanding.get(tag) is False and not self.is_closed

    def flush(self) -> None:
        """Send the acks marked since the last flush."""
        self._flush_scheduled = False
        outstanding = self._outstanding
        if not outstanding:
            return
        if self.is_closed:
            outstanding.clear()  # the broker has put them back already
            return
        settled = [tag for tag, done in outstanding.items() if done]
        if not settled:
            return
        for tag in settled:
            del outstanding[tag]
        # Tags grow in arrival order: the settled ones below the first still running form
        # the run one multiple ack may cover; those above it are acked one by one.
        running = next(iter(outstanding), None)
        run = len(settled) if running is None else bisect.bisect_left(settled, running)
        channel = self.channel
        if run:
            channel.basic_ack(settled[run - 1], multiple=True)
        for tag in settled[run:]:
            channel.basic_ack(tag, multiple=False)

    # -- callbacks --------------------------------------------------------------------------

    def _future(self) -> asyncio.Future[Any]:
        if self.is_closed:
            raise pika.exceptions.ChannelWrongStateError(
                f"the channel consuming {self.queue} is closed"
            )
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def _closed(self, _channel: pika.channel.Channel, reason: BaseException) -> None:
        self.close_reason = reason
        self._outstanding.clear()
        for future in list(self._pending):
            if not future.done():
                future.set_exception(reason)
        for callback in list(self._closed_callbacks):
            callback(reason)

    def _cancelled_by_broker(self, _frame: object) -> None:
        self.tag = None
        for callback in list(self._cancelled_callbacks):
            callback()


class Inbound:
    """One delivery, read-only, with the properties a consumer looks at.

    `timestamp` is seconds since the epoch (or None) and `expiration` the raw property (a
    string of milliseconds), as on the wire.
    """

    __slots__ = (
        "body",
        "delivery_tag",
        "exchange",
        "headers",
        "properties",
        "redelivered",
        "routing_key",
        "subscription",
    )

    def __init__(
        self,
        subscription: Subscription,
        method: pika.spec.Basic.Deliver,
        properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        self.subscription = subscription
        self.body = body
        self.properties = properties
        # pika decodes a fresh table for every delivery: read as it is, no copy.
        self.headers: Mapping[str, Any] = properties.headers or {}
        assert method.delivery_tag is not None
        self.delivery_tag: int = method.delivery_tag
        self.exchange: str = method.exchange or ""
        self.routing_key: str = method.routing_key or ""
        self.redelivered = bool(method.redelivered)

    def __repr__(self) -> str:
        return f"<Inbound {self.subscription.queue} tag={self.delivery_tag} id={self.message_id}>"

    @property
    def message_id(self) -> str | None:
        value = self.properties.message_id
        return str(value) if value else None

    @property
    def content_type(self) -> str | None:
        return self.properties.content_type

    @property
    def content_encoding(self) -> str | None:
        return self.properties.content_encoding

    @property
    def channel_closed(self) -> bool:
        """Whether the delivery's channel is gone (the broker has the message back, then)."""
        return self.subscription.is_closed

    @property
    def processed(self) -> bool:
        """Whether it was settled (or returned) already, or its channel is gone."""
        return not self.subscription.outstanding(self.delivery_tag)

    def ack(self) -> bool:
        """Settle it (acked with the next batch); False when its channel is gone."""
        return self.subscription.ack(self.delivery_tag)

    def nack(self, *, requeue: bool = True) -> bool:
        return self.subscription.nack(self.delivery_tag, requeue=requeue)


def _set(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)
