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
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from listener.errors import AuthenticationFailed, BrokerUnreachable
from listener.middleware import Chain, Middleware, installed_middleware
from listener.runner import signals
from listener.runner.amqp_transport import Transport
from listener.runner.consumer import Consumer
from listener.runner.startup import StartRetries, warn_consumer_timeouts
from listener.runner.subscriptions import (
    CANCEL_WAIT,
    Subscriptions,
    describe_close,
    reconnect_backoff,
    stopped_within,
)
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.runner.blame import Isolation

__all__ = ["EXIT_RECYCLE", "Worker"]

log = logging.getLogger("listener.worker")

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
        self.warn_timeouts = warn_timeouts
        self._on_state = on_state
        self._state = ""  # the last state told to on_state
        self._started = False
        self._transport: Transport | None = None
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self.subscriptions = Subscriptions(
            settings,
            paused=paused,
            transport=lambda: self._transport,
            closing=lambda: self._closing,
            stop=self._stop,
            lost=self._lost,
            on_change=self._update_ready,
        )
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

    @property
    def paused(self) -> bool:
        """Whether consuming is paused (asked for; `ready` says when it took effect)."""
        return self.subscriptions.paused

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
        self.subscriptions.set_paused(True)
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
        self.subscriptions.set_paused(False)
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
                if await stopped_within(self._stop, retries.failed(exc)):
                    return None

    async def _start(self, transport: Transport) -> None:
        async with self.subscriptions.lock:
            self._lost.clear()
            self._transport = transport
            for consumer in self.consumers:
                consumer.transport = transport
                await transport.declare(consumer.listener.topology(self.settings))
            paused = self.paused
            await self.subscriptions.start(self.consumers, transport, paused=paused)
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
        self.ready = live and not self.paused and self.subscriptions.complete
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

    def _apply_pause(self) -> None:
        if self._started:  # else _start consumes, or not, as `paused` says then
            self.subscriptions.align()

    def _on_connection_closed(self, exc: BaseException | None) -> None:
        if not self._closing:
            log.warning("connection to the broker lost (%s)", describe_close(exc))
            self._lost.set()
            self._update_ready("connection lost")

    async def _reconnect(self) -> Transport | None:
        old = self._transport
        if old is not None:
            self._closing = True
            await old.close(timeout=CANCEL_WAIT)
            self._closing = False
        backoff = reconnect_backoff()
        while not self._stop.is_set():
            transport: Transport | None = None
            try:
                transport = await Transport.connect(self.settings, name=self._connection_name)
                await self._start(transport)
            except Exception as exc:
                if transport is not None:
                    await transport.close(timeout=CANCEL_WAIT)
                wait = backoff.next()
                log.warning("reconnecting failed (%s); next try in %.1fs", exc, wait)
                if await stopped_within(self._stop, wait):
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
        await self.subscriptions.stop()
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
            await asyncio.wait(pending, timeout=CANCEL_WAIT)
        if self._transport is not None:
            await self._transport.close(timeout=CANCEL_WAIT)
        await self.subscriptions.close_retiring()
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
