"""A worker's subscriptions: which listeners consume now, and bringing them in line.

A worker holds one subscription (`listener.runner.inbound.Subscription`: a channel and a
consumer on it) per listener. Which of them consume at a given moment changes for several
reasons, each handled here apart from the worker's connection life (connect, reconnect,
drain), which only starts them (`start`) and stops them (`stop`, `close_retiring`):

- **Pause and resume.** `set_paused(True)` and `align()` cancel every consumer (basic.cancel
  on its channel, which stays open), so nothing new arrives while the messages in flight
  finish and are acked on that channel as usual; a delivery already on its way when the
  cancel was sent is handed back, as the drain does. `set_paused(False)` and `align()`
  consume again on the same channels (a fresh one where the broker closed it meanwhile).
  One task aligns at a time, looping until the state it reached is the one asked for.
- **A channel the broker closed** (consumer_timeout, a refused ack, ...) or **a consumer it
  cancelled** (its queue deleted, a node gone): that listener alone is declared and
  subscribed again on a fresh channel, with back-off, while the others carry on. While
  paused it is left alone: resuming subscribes it.
- **A replaced consumer's channel** closes only once the handlers running on it returned
  (`_retire`), so that a message is never handled twice at once.

`complete` tells the worker's readiness whether every listener consumes now; each change is
told through `on_change(reason)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence

from listener._amqp_errors import consume_error
from listener.runner.amqp_transport import Subscription, Transport
from listener.runner.backoff import Backoff
from listener.runner.consumer import Consumer
from listener.settings import Settings

__all__ = ["CANCEL_WAIT", "Subscriptions", "describe_close", "reconnect_backoff", "stopped_within"]

log = logging.getLogger("listener.worker")

#: Back-off after a lost connection or consumer: doubles from the first value up to the cap,
#: with jitter so that many workers do not reconnect in lock-step.
_BACKOFF_FIRST = 0.5
_BACKOFF_CAP = 15.0
#: How long cancelled handlers get to unwind (and hand their messages back) after the grace
#: period, and how long a basic.cancel may wait for its answer during the drain.
CANCEL_WAIT = 2.0


class Subscriptions:
    """The subscriptions of a worker's consumers, and which of them consume now.

    `transport()` is the worker's connection of the moment (None before the first);
    `closing()` says whether the worker closes it on purpose (a reconnect, the drain);
    `stop` and `lost` are the worker's events (asked to stop; the connection was lost).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        paused: bool,
        transport: Callable[[], Transport | None],
        closing: Callable[[], bool],
        stop: asyncio.Event,
        lost: asyncio.Event,
        on_change: Callable[[str], None],
    ) -> None:
        self.settings = settings
        #: Whether consuming is paused (asked for; `complete` says when it took effect).
        self.paused = paused
        self.consumers: Sequence[Consumer] = ()
        #: Held while consumers are subscribed or cancelled, so that a pause, a resume, a
        #: reconnect and a re-subscription never interleave.
        self.lock = asyncio.Lock()
        #: Each consumer's subscription on the current connection.
        self.active: dict[Consumer, Subscription] = {}
        #: Consumers whose basic.consume is in force now.
        self._consuming: set[Consumer] = set()
        self._pausing: asyncio.Task[None] | None = None
        self._resubscribing: dict[Consumer, asyncio.Task[None]] = {}
        #: Channels of cancelled consumers, closing once their handlers return.
        self._retiring: set[asyncio.Future[None]] = set()
        self._transport = transport
        self._closing = closing
        self._stop = stop
        self._lost = lost
        self._on_change = on_change

    @property
    def complete(self) -> bool:
        """Every consumer consumes now, and none is being subscribed again."""
        return not self._resubscribing and all(c in self._consuming for c in self.consumers)

    def set_paused(self, paused: bool) -> None:
        """Ask for consuming to be paused, or not; `align()` brings it about."""
        self.paused = paused

    async def start(
        self, consumers: Sequence[Consumer], transport: Transport, *, paused: bool
    ) -> None:
        """On a new connection (hold `lock`): subscribe every consumer, unless `paused` (a
        reconnect while paused stays paused)."""
        self.consumers = consumers
        self.active = {}
        self._consuming = set()
        for consumer in consumers:
            consumer.accepting = not paused
            if not paused:
                await self._subscribe(consumer, transport)

    async def stop(self) -> None:
        """The drain: no new deliveries; the ones received can still be acked."""
        for task in list(self._resubscribing.values()):
            task.cancel()
        if self._pausing is not None and not self._pausing.done():
            # Let a pause or resume under way finish its step (it stops after it), so that
            # every consumer it subscribed is known and cancelled below.
            await asyncio.wait({self._pausing}, timeout=CANCEL_WAIT)
            self._pausing.cancel()
        for consumer in self.consumers:
            consumer.accepting = False
        for consumer, subscription in self.active.items():
            if consumer not in self._consuming:
                continue  # paused: cancelled already
            # Bounded: a broker that stopped answering must not eat the grace period.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(subscription.cancel(), CANCEL_WAIT)

    async def close_retiring(self) -> None:
        """At the end of the drain: stop waiting to close cancelled consumers' channels."""
        for closing in list(self._retiring):
            closing.cancel()
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=CANCEL_WAIT)

    async def _subscribe(self, consumer: Consumer, transport: Transport) -> None:
        listener = consumer.listener
        subscription = await transport.consume(
            listener.queue, listener.concurrency, consumer.on_message
        )
        self.active[consumer] = subscription
        self._consuming.add(consumer)
        subscription.on_closed(functools.partial(self._on_channel_closed, consumer, subscription))
        subscription.on_cancelled(
            functools.partial(self._on_consumer_cancelled, consumer, subscription)
        )

    def align(self) -> None:
        """Bring the consumers in line with `paused`, in a task (signal handlers are sync).

        Only once they were first subscribed: until then `start` consumes, or not, as
        `paused` says then.
        """
        if self._pausing is None or self._pausing.done():
            self._pausing = asyncio.ensure_future(self._align_consumers())
        # A task already running loops until the state it reached is the one asked for.

    async def _align_consumers(self) -> None:
        try:
            while not (self._closing() or self._stop.is_set()):
                transport = self._transport()
                if transport is None or transport.is_closed or self._lost.is_set():
                    return  # (re)connecting: `start` consumes, or not, as `paused` says then
                paused = self.paused
                async with self.lock:
                    if paused:
                        await self._cancel_consumers()
                    else:
                        await self._consume_again(transport)
                if self.paused == paused:
                    return
        finally:
            self._on_change("paused" if self.paused else "resumed")

    async def _cancel_consumers(self) -> None:
        for task in list(self._resubscribing.values()):
            task.cancel()
        for consumer in self.consumers:
            # A delivery already on its way when the cancel goes out is handed back.
            consumer.accepting = False
        for consumer in list(self._consuming):
            subscription = self.active.get(consumer)
            if subscription is not None:
                try:
                    await asyncio.wait_for(subscription.cancel(), CANCEL_WAIT)
                except Exception as exc:
                    log.warning(
                        "%s: cancelling its consumer failed (%s); deliveries still arriving "
                        "are handed back",
                        consumer.listener.__name__,
                        describe_close(exc),
                    )
            # Only now: a cancel cut short by the drain is sent again by the drain.
            self._consuming.discard(consumer)

    async def _consume_again(self, transport: Transport) -> None:
        for consumer in self.consumers:
            consumer.accepting = True
            if consumer in self._consuming:
                continue
            subscription = self.active.get(consumer)
            try:
                if subscription is not None and not subscription.is_closed:
                    # The same channel: the messages still in flight on it keep their acks.
                    try:
                        await subscription.consume()
                    except Exception as exc:
                        raise consume_error(exc, consumer.listener.queue) from exc
                    self._consuming.add(consumer)
                else:
                    self.active.pop(consumer, None)
                    await self._subscribe(consumer, transport)
            except Exception as exc:
                log.warning(
                    "%s: consuming again failed (%s); retrying on a fresh channel",
                    consumer.listener.__name__,
                    exc,
                )
                self._resubscribe_later(consumer)

    def _on_channel_closed(
        self, consumer: Consumer, subscription: Subscription, exc: BaseException | None
    ) -> None:
        # A consumer channel closed by the broker (consumer_timeout, a refused ack, ...)
        # would leave that listener consuming nothing.
        transport = self._transport()
        if transport is None or transport.is_closed:
            return  # the whole connection went: _on_connection_closed deals with it
        if self.active.get(consumer) is subscription and not self._closing():
            self._consuming.discard(consumer)
            why = describe_close(exc)
            if self.paused:
                log.warning(
                    "%s: its channel was closed by the broker while paused (%s); resuming "
                    "subscribes it on a fresh channel",
                    consumer.listener.__name__,
                    why,
                )
                return
            log.warning(
                "%s: its channel was closed by the broker (%s); subscribing again",
                consumer.listener.__name__,
                why,
            )
            self._resubscribe_later(consumer)

    def _on_consumer_cancelled(self, consumer: Consumer, subscription: Subscription) -> None:
        # The broker cancelled the consumer (its queue was deleted, a node went away).
        if self.active.get(consumer) is subscription and not self._closing():
            self._consuming.discard(consumer)
            if self.paused:
                log.warning(
                    "%s: the broker cancelled its consumer on %s while paused",
                    consumer.listener.__name__,
                    consumer.listener.queue,
                )
                return
            log.warning(
                "%s: the broker cancelled its consumer on %s; declaring and subscribing again",
                consumer.listener.__name__,
                consumer.listener.queue,
            )
            self._resubscribe_later(consumer)

    def _resubscribe_later(self, consumer: Consumer) -> None:
        if consumer not in self._resubscribing:
            self._resubscribing[consumer] = asyncio.ensure_future(self._resubscribe(consumer))
            self._on_change(f"{consumer.listener.__name__} lost its consumer")

    async def _resubscribe(self, consumer: Consumer) -> None:
        """Give one listener a fresh channel and consumer; the others are left alone."""
        backoff = reconnect_backoff()
        try:
            while not (self._closing() or self._lost.is_set() or self._stop.is_set()):
                transport = self._transport()
                if transport is None or transport.is_closed:
                    self._lost.set()
                    return
                try:
                    async with self.lock:
                        if self.paused:
                            return  # resuming subscribes it
                        old = self.active.pop(consumer, None)
                        self._consuming.discard(consumer)
                        if old is not None:
                            await self._retire(consumer, old)
                        await transport.declare(consumer.listener.topology(self.settings))
                        await self._subscribe(consumer, transport)
                except Exception as exc:
                    wait = backoff.next()
                    log.warning(
                        "%s: subscribing again failed (%s); next try in %.1fs",
                        consumer.listener.__name__,
                        exc,
                        wait,
                    )
                    if await stopped_within(self._stop, wait):
                        return
                    continue
                log.info(
                    "%s: consuming %s again", consumer.listener.__name__, consumer.listener.queue
                )
                return
        finally:
            if self._resubscribing.get(consumer) is asyncio.current_task():
                del self._resubscribing[consumer]
            self._on_change(f"{consumer.listener.__name__} has no consumer")

    async def _retire(self, consumer: Consumer, old: Subscription) -> None:
        """Close a replaced consumer's channel, once the handlers running on it returned.

        A consumer the broker cancelled keeps its channel, and the deliveries on it stay
        with this worker. Closing the channel at once would hand the running ones back to
        the queue, and so to the new consumer, while their first run goes on: the same
        message handled twice at once. So the first run is waited for, and acked on its
        own channel, while the new consumer takes new deliveries.
        """
        running = set(consumer.in_flight)
        if not running or old.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.close(), CANCEL_WAIT)
            return
        log.info(
            "%s: %d message(s) still running on the cancelled consumer's channel; it closes "
            "once they are done",
            consumer.listener.__name__,
            len(running),
        )

        async def close_when_done() -> None:
            await asyncio.wait(running)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.close(), CANCEL_WAIT)

        task = asyncio.ensure_future(close_when_done())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


def describe_close(exc: BaseException | None) -> str:
    """Why a connection or channel closed, for a log line."""
    if exc is None:
        return "closed"
    return f"{type(exc).__name__}: {exc}"


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`, waking early if `stop` is set; returns whether it was."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


def reconnect_backoff() -> Backoff:
    """The back-off after a lost connection or consumer."""
    return Backoff(_BACKOFF_FIRST, _BACKOFF_CAP, jitter=(0.5, 1.5))
