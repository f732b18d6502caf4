"""A worker process: one connection, a consumer per listener, recovery, graceful drain.

Besides stopping, a worker can **pause**: `pause()` (SIGUSR2) cancels its consumers
(basic.cancel on each consumer's channel, which stays open), so nothing new arrives while the
messages in flight finish and are acked on that channel as usual; a delivery already on its
way when the cancel was sent is handed back, as the drain does. `resume()` (SIGCONT) consumes
again on the same channels (a fresh one where the broker closed it meanwhile). A paused
worker keeps its connection, so heartbeats flow; a reconnect while paused declares the
topology and stays paused; the consumer watchdog leaves a paused worker's consumers alone.

**Readiness**: `ready` is true exactly while every listener's consumer is live (started,
connected, not paused, not stopping, no consumer being re-subscribed). `on_state` hears each
change as one word, "ready", "paused" (connected, consuming nothing on purpose) or
"not-ready" followed by the reason; the supervisor forwards it to its health endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from listener._amqp_errors import consume_error
from listener.errors import AuthenticationFailed, BrokerUnreachable
from listener.middleware import Chain, Middleware, installed_middleware
from listener.runner import signals
from listener.runner.amqp_transport import Subscription, Transport
from listener.runner.backoff import Backoff
from listener.runner.consumer import Consumer
from listener.runner.startup import StartRetries, warn_consumer_timeouts
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.runner.blame import Isolation

__all__ = ["EXIT_RECYCLE", "Worker"]

log = logging.getLogger("listener.worker")

#: Back-off after a lost connection or consumer: doubles from the first value up to the cap,
#: with jitter so that many workers do not reconnect in lock-step.
_BACKOFF_FIRST = 0.5
_BACKOFF_CAP = 15.0
#: How long cancelled handlers get to unwind (and hand their messages back) after the grace
#: period, and how long a basic.cancel may wait for its answer during the drain.
_CANCEL_WAIT = 2.0
#: The exit code of a worker that stops to be replaced, not because it failed: it carries
#: sync handler threads stuck past their timeout, which only a new process gets rid of.
EXIT_RECYCLE = 3


class Worker:
    """Hosts listeners in this process until stopped.

    `run()` returns the process exit code: 0 after a clean stop, 1 when a handler made the
    worker exit (SystemExit in a handler).

    Args:
        paused: start paused (connect and declare, consume nothing until `resume()`).
        on_state: called with "ready", "paused" or "not-ready <reason>" whenever readiness
            changes (see the module docstring).
        warn_timeouts: log a warning at `run()` for each listener whose `timeout` is not
            below the broker's consumer timeout (a supervisor warns once for all its workers).
        isolation: the journal, gate and suspects of a supervised worker, with which its
            supervisor blames a death on the one message that caused it
            (`listener.runner.blame`); None runs without (no death is ever blamed then).
    """

    def __init__(
        self,
        listeners: Sequence[type[Listener]],
        settings: Settings,
        *,
        fail_fast: bool = False,
        install_signals: bool = True,
        second_signal_exits: bool = True,
        middleware: Sequence[Middleware] | None = None,
        paused: bool = False,
        on_state: Callable[[str], None] | None = None,
        warn_timeouts: bool = True,
        isolation: Isolation | None = None,
    ) -> None:
        self.listeners = list(listeners)
        self.isolation = isolation
        self.chain = Chain(installed_middleware() if middleware is None else middleware)
        self.settings = settings
        self.fail_fast = fail_fast
        self.install_signals = install_signals
        self.second_signal_exits = second_signal_exits
        self.exit_code = 0
        self.consumers: list[Consumer] = []
        self.ready = False
        #: Whether consuming is paused (asked for; `ready` says when it took effect).
        self.paused = paused
        self.warn_timeouts = warn_timeouts
        self._on_state = on_state
        self._state = ""  # the last state told to on_state
        self._started = False
        #: Consumers whose basic.consume is in force now.
        self._consuming: set[Consumer] = set()
        #: Held while consumers are subscribed or cancelled, so that a pause, a resume, a
        #: reconnect and a re-subscription never interleave.
        self._consume_lock = asyncio.Lock()
        self._pausing: asyncio.Task[None] | None = None
        self._subscriptions: dict[Consumer, Subscription] = {}
        self._resubscribing: dict[Consumer, asyncio.Task[None]] = {}
        #: Channels of cancelled consumers, closing once their handlers return.
        self._retiring: set[asyncio.Future[None]] = set()
        self._transport: Transport | None = None
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        # Named after its queues, so that an operator can tell connections apart in the
        # management UI (and close one on purpose).
        queues = ",".join(cls.queue for cls in self.listeners)
        self._connection_name = f"amqp-listener worker pid={os.getpid()} [{queues[:180]}]"

    def __repr__(self) -> str:
        totals = {"handled": 0, "retried": 0, "parked": 0}
        for consumer in self.consumers:
            for key in totals:
                totals[key] += consumer.counts[key]
        in_flight = sum(len(c.in_flight) for c in self.consumers)
        counts = " ".join(f"{k}={v}" for k, v in totals.items())
        return f"<Worker pid={os.getpid()} {counts} in_flight={in_flight}>"

    def request_stop(self, reason: str = "requested") -> None:
        """Begin a graceful stop (safe to call more than once)."""
        if not self._stop.is_set():
            log.info(
                "stopping (%s): no new messages; in-flight ones get %gs to finish",
                reason,
                self.settings.grace_period,
            )
            self._stop.set()
            self._update_ready("stopping")

    def pause(self, reason: str = "requested") -> None:
        """Stop taking new messages; those in flight finish normally (safe to repeat)."""
        if self.paused or self._stop.is_set():
            return
        self.paused = True
        in_flight = sum(len(consumer.in_flight) for consumer in self.consumers)
        log.info(
            "pausing (%s): no new messages until resumed; %d in-flight message(s) finish",
            reason,
            in_flight,
        )
        self._apply_pause()

    def resume(self, reason: str = "requested") -> None:
        """Consume again after `pause()` (safe to repeat)."""
        if not self.paused or self._stop.is_set():
            return
        self.paused = False
        log.info("resuming (%s): consuming again", reason)
        self._apply_pause()

    async def run(self) -> int:
        """Connect, declare, consume until stopped, drain. Returns the exit code.

        Raises:
            BrokerUnreachable, AuthenticationFailed, TopologyMismatch: at start-up.
        """
        if self.install_signals:
            signals.install(
                asyncio.get_running_loop(),
                lambda name: self.request_stop(f"received {name}"),
                second_exits=self.second_signal_exits,
                on_pause=lambda name: self.pause(f"received {name}"),
                on_resume=lambda name: self.resume(f"received {name}"),
            )
        if self.warn_timeouts:
            warn_consumer_timeouts(self.listeners, self.settings)
        transport = await self._connect_at_start()
        if transport is None:  # stopped while the broker was still out of reach
            return self.exit_code
        try:
            # Inside the try: a listener whose __init__ raises must not leak the connection.
            self.consumers = [
                Consumer(
                    cls,
                    transport,
                    settings=self.settings,
                    on_fatal=self._fatal,
                    chain=self.chain,
                    on_stuck=self._thread_stuck,
                    isolation=self.isolation,
                )
                for cls in self.listeners
            ]
            await self._start(transport)
        except BaseException:
            await transport.close()
            raise
        while not self._stop.is_set():
            await _first_of(self._stop, self._lost)
            if self._stop.is_set():
                break
            self._update_ready("connection lost")
            if await self._reconnect() is None:
                break
        await self._drain()
        return self.exit_code

    async def _connect_at_start(self) -> Transport | None:
        retries = StartRetries(self.settings, fail_fast=self.fail_fast, log=log)
        while True:
            try:
                return await Transport.connect(self.settings, name=self._connection_name)
            except AuthenticationFailed:
                raise
            except BrokerUnreachable as exc:
                if await _stopped_within(self._stop, retries.failed(exc)):
                    return None

    async def _start(self, transport: Transport) -> None:
        async with self._consume_lock:
            self._lost.clear()
            self._transport = transport
            for consumer in self.consumers:
                consumer.transport = transport
                await transport.declare(consumer.listener.topology(self.settings))
            self._subscriptions = {}
            self._consuming = set()
            paused = self.paused
            for consumer in self.consumers:
                consumer.accepting = not paused
                if not paused:  # a reconnect while paused stays paused
                    await self._subscribe(consumer, transport)
            transport.on_close(self._on_connection_closed)
        self._started = True
        if self.paused != paused:
            self._apply_pause()  # pause() or resume() came while the consumers were set up
        self.chain.before("on_worker_start", self)
        names = ", ".join(
            f"{c.listener.__name__} ({c.listener.queue}, concurrency {c.listener.concurrency})"
            for c in self.consumers
        )
        if self.paused:
            log.info(
                "worker pid=%d connected to %s, paused (consuming nothing until resumed): %s",
                os.getpid(),
                self.settings.redacted_url,
                names,
            )
        else:
            log.info(
                "worker pid=%d consuming on %s: %s", os.getpid(), self.settings.redacted_url, names
            )
        self._update_ready("started")

    async def _subscribe(self, consumer: Consumer, transport: Transport) -> None:
        listener = consumer.listener
        subscription = await transport.consume(
            listener.queue, listener.concurrency, consumer.on_message
        )
        self._subscriptions[consumer] = subscription
        self._consuming.add(consumer)
        subscription.on_closed(functools.partial(self._on_channel_closed, consumer, subscription))
        subscription.on_cancelled(
            functools.partial(self._on_consumer_cancelled, consumer, subscription)
        )

    def _apply_pause(self) -> None:
        """Bring the consumers in line with `paused`, in a task (signal handlers are sync)."""
        if not self._started:
            return  # _start consumes, or not, as `paused` says then
        if self._pausing is None or self._pausing.done():
            self._pausing = asyncio.ensure_future(self._align_consumers())
        # A task already running loops until the state it reached is the one asked for.

    async def _align_consumers(self) -> None:
        try:
            while not (self._closing or self._stop.is_set()):
                transport = self._transport
                if transport is None or transport.is_closed or self._lost.is_set():
                    return  # (re)connecting: _start consumes, or not, as `paused` says then
                paused = self.paused
                async with self._consume_lock:
                    if paused:
                        await self._cancel_consumers()
                    else:
                        await self._consume_again(transport)
                if self.paused == paused:
                    return
        finally:
            self._update_ready("paused" if self.paused else "resumed")

    async def _cancel_consumers(self) -> None:
        for task in list(self._resubscribing.values()):
            task.cancel()
        for consumer in self.consumers:
            # A delivery already on its way when the cancel goes out is handed back.
            consumer.accepting = False
        for consumer in list(self._consuming):
            subscription = self._subscriptions.get(consumer)
            if subscription is not None:
                try:
                    await asyncio.wait_for(subscription.cancel(), _CANCEL_WAIT)
                except Exception as exc:
                    log.warning(
                        "%s: cancelling its consumer failed (%s); deliveries still arriving "
                        "are handed back",
                        consumer.listener.__name__,
                        _describe(exc),
                    )
            # Only now: a cancel cut short by the drain is sent again by the drain.
            self._consuming.discard(consumer)

    async def _consume_again(self, transport: Transport) -> None:
        for consumer in self.consumers:
            consumer.accepting = True
            if consumer in self._consuming:
                continue
            subscription = self._subscriptions.get(consumer)
            try:
                if subscription is not None and not subscription.is_closed:
                    # The same channel: the messages still in flight on it keep their acks.
                    try:
                        await subscription.consume()
                    except Exception as exc:
                        raise consume_error(exc, consumer.listener.queue) from exc
                    self._consuming.add(consumer)
                else:
                    self._subscriptions.pop(consumer, None)
                    await self._subscribe(consumer, transport)
            except Exception as exc:
                log.warning(
                    "%s: consuming again failed (%s); retrying on a fresh channel",
                    consumer.listener.__name__,
                    exc,
                )
                self._resubscribe_later(consumer)

    def _update_ready(self, reason: str) -> None:
        """Recompute `ready` and tell `on_state` when the state changed."""
        live = (
            self._started
            and not self._closing
            and not self._stop.is_set()
            and not self._lost.is_set()
            and self._transport is not None
            and not self._transport.is_closed
        )
        self.ready = (
            live
            and not self.paused
            and not self._resubscribing
            and all(consumer in self._consuming for consumer in self.consumers)
        )
        if self.ready:
            state = "ready"
        elif live and self.paused:
            state = "paused"
        else:
            state = f"not-ready {reason}"
        if state.split(" ", 1)[0] == self._state.split(" ", 1)[0]:
            return
        self._state = state
        if self._on_state is not None:
            self._on_state(state)

    def _on_connection_closed(self, exc: BaseException | None) -> None:
        if not self._closing:
            log.warning("connection to the broker lost (%s)", _describe(exc))
            self._lost.set()
            self._update_ready("connection lost")

    def _on_channel_closed(
        self, consumer: Consumer, subscription: Subscription, exc: BaseException | None
    ) -> None:
        # A consumer channel closed by the broker (consumer_timeout, a refused ack, ...)
        # would leave that listener consuming nothing.
        transport = self._transport
        if transport is None or transport.is_closed:
            return  # the whole connection went: _on_connection_closed deals with it
        if self._subscriptions.get(consumer) is subscription and not self._closing:
            self._consuming.discard(consumer)
            why = _describe(exc)
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
        if self._subscriptions.get(consumer) is subscription and not self._closing:
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
            self._update_ready(f"{consumer.listener.__name__} lost its consumer")

    async def _resubscribe(self, consumer: Consumer) -> None:
        """Give one listener a fresh channel and consumer; the others are left alone."""
        backoff = _reconnect_backoff()
        try:
            while not (self._closing or self._lost.is_set() or self._stop.is_set()):
                transport = self._transport
                if transport is None or transport.is_closed:
                    self._lost.set()
                    return
                try:
                    async with self._consume_lock:
                        if self.paused:
                            return  # resuming subscribes it
                        old = self._subscriptions.pop(consumer, None)
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
                    if await _stopped_within(self._stop, wait):
                        return
                    continue
                log.info(
                    "%s: consuming %s again", consumer.listener.__name__, consumer.listener.queue
                )
                return
        finally:
            if self._resubscribing.get(consumer) is asyncio.current_task():
                del self._resubscribing[consumer]
            self._update_ready(f"{consumer.listener.__name__} has no consumer")

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
                await asyncio.wait_for(old.close(), _CANCEL_WAIT)
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
                await asyncio.wait_for(old.close(), _CANCEL_WAIT)

        task = asyncio.ensure_future(close_when_done())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _reconnect(self) -> Transport | None:
        old = self._transport
        if old is not None:
            self._closing = True
            await old.close(timeout=_CANCEL_WAIT)
            self._closing = False
        backoff = _reconnect_backoff()
        while not self._stop.is_set():
            transport: Transport | None = None
            try:
                transport = await Transport.connect(self.settings, name=self._connection_name)
                await self._start(transport)
            except Exception as exc:
                if transport is not None:
                    await transport.close(timeout=_CANCEL_WAIT)
                wait = backoff.next()
                log.warning("reconnecting failed (%s); next try in %.1fs", exc, wait)
                if await _stopped_within(self._stop, wait):
                    return None
                continue
            log.info("reconnected to %s", self.settings.redacted_url)
            return transport
        return None

    def _thread_stuck(self) -> None:
        limit = self.settings.max_stuck_threads
        stuck = sum(consumer.stuck_threads for consumer in self.consumers)
        if limit and stuck >= limit and self.exit_code == 0:
            # Python cannot kill a thread; a process can be replaced. Drain the others first.
            self.exit_code = EXIT_RECYCLE
            self.request_stop(
                f"{stuck} sync handler thread(s) stuck past their timeout; recycling this worker"
            )

    def _fatal(self, reason: str) -> None:
        self.exit_code = 1
        self.request_stop(reason)

    async def _drain(self) -> None:
        self._closing = True
        self._update_ready("stopping")
        for task in list(self._resubscribing.values()):
            task.cancel()
        if self._pausing is not None and not self._pausing.done():
            # Let a pause or resume under way finish its step (it stops after it), so that
            # every consumer it subscribed is known and cancelled below.
            await asyncio.wait({self._pausing}, timeout=_CANCEL_WAIT)
            self._pausing.cancel()
        for consumer in self.consumers:
            consumer.accepting = False
        for consumer, subscription in self._subscriptions.items():
            if consumer not in self._consuming:
                continue  # paused: cancelled already
            # Bounded: a broker that stopped answering must not eat the grace period.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(subscription.cancel(), _CANCEL_WAIT)
        pending = {task for consumer in self.consumers for task in consumer.in_flight}
        if pending:
            log.info(
                "waiting up to %gs for %d in-flight message(s)",
                self.settings.grace_period,
                len(pending),
            )
            _done, pending = await asyncio.wait(pending, timeout=self.settings.grace_period)
        if pending:
            log.warning(
                "%d message(s) did not finish within %gs; they go back to the queue",
                len(pending),
                self.settings.grace_period,
            )
            settling = {task for consumer in self.consumers for task in consumer.settling}
            for task in pending - settling:
                task.cancel()
            await asyncio.wait(pending, timeout=_CANCEL_WAIT)
        if self._transport is not None:
            await self._transport.close(timeout=_CANCEL_WAIT)
        for closing in list(self._retiring):
            closing.cancel()
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=_CANCEL_WAIT)
        for consumer in self.consumers:  # idempotent listeners' database connections
            if consumer.inbox is not None:
                await consumer.inbox.aclose()
        self.chain.after("on_worker_stop", self)
        log.info("worker pid=%d stopped: %r", os.getpid(), self)


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`, waking early if `stop` is set; returns whether it was."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


def _reconnect_backoff() -> Backoff:
    return Backoff(_BACKOFF_FIRST, _BACKOFF_CAP, jitter=(0.5, 1.5))


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    return f"{type(exc).__name__}: {exc}"
