"""A worker process: one connection, a consumer per listener, reconnects, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from listener.errors import AuthenticationFailed, BrokerUnreachable
from listener.runner import signals
from listener.runner.amqp_transport import Subscription, Transport
from listener.runner.consumer import Consumer
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener

__all__ = ["Worker"]

log = logging.getLogger("listener.worker")

#: Reconnect back-off after a lost connection: doubles from the first value up to the cap,
#: with jitter so that many workers do not reconnect in lock-step.
_BACKOFF_FIRST = 0.5
_BACKOFF_CAP = 15.0
#: How long cancelled handlers get to unwind after the grace period before the connection
#: closes under them.
_CANCEL_WAIT = 2.0


class Worker:
    """Hosts listeners in this process until stopped.

    `run()` returns the process exit code: 0 after a clean stop, 1 when a handler made the
    worker exit (SystemExit in a handler).
    """

    def __init__(
        self,
        listeners: Sequence[type[Listener]],
        settings: Settings,
        *,
        fail_fast: bool = False,
        install_signals: bool = True,
    ) -> None:
        self.listeners = list(listeners)
        self.settings = settings
        self.fail_fast = fail_fast
        self.install_signals = install_signals
        self.exit_code = 0
        self.consumers: list[Consumer] = []
        self._subscriptions: list[Subscription] = []
        self._transport: Transport | None = None
        self._stop: asyncio.Event | None = None
        self._lost: asyncio.Event | None = None
        self._closing = False
        self._connection_name = "amqp-listener worker"
        self.ready = False

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
        if self._stop is not None and not self._stop.is_set():
            log.info(
                "stopping (%s): no new messages; in-flight ones get %gs to finish",
                reason,
                self.settings.grace_period,
            )
            self._stop.set()

    async def run(self) -> int:
        """Connect, declare, consume until stopped, drain. Returns the exit code.

        Raises:
            BrokerUnreachable, AuthenticationFailed, TopologyMismatch: at start-up.
        """
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        if self.install_signals:
            signals.install(loop, lambda name: self.request_stop(f"received {name}"))
        # Named after its queues, so an operator can tell the connections apart in the
        # management UI and close one of them on purpose.
        queues = ",".join(cls.queue for cls in self.listeners)
        self._connection_name = f"amqp-listener worker pid={os.getpid()} [{queues[:180]}]"
        transport = await self._connect_at_start()
        for cls in self.listeners:
            self.consumers.append(
                Consumer(cls, transport, settings=self.settings, on_fatal=self._fatal)
            )
        try:
            await self._start(transport)
        except BaseException:
            await transport.close()
            raise
        while not self._stop.is_set():
            stop_wait = asyncio.ensure_future(self._stop.wait())
            lost_wait = asyncio.ensure_future(self._lost.wait())
            await asyncio.wait({stop_wait, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            lost_wait.cancel()
            if self._stop.is_set():
                break
            self.ready = False
            reconnected = await self._reconnect()
            if reconnected is None:
                break
        await self._drain()
        return self.exit_code

    async def _connect_at_start(self) -> Transport:
        attempts = 1 if self.fail_fast else self.settings.connect_attempts
        delay = 1.0
        for attempt in range(1, attempts + 1):
            try:
                return await Transport.connect(self.settings, name=self._connection_name)
            except AuthenticationFailed:
                raise
            except BrokerUnreachable as exc:
                if attempt == attempts:
                    raise BrokerUnreachable(f"{exc} (gave up after {attempts} attempt(s))") from exc
                wait = delay * random.uniform(0.8, 1.2)
                log.warning(
                    "broker not reachable (attempt %d of %d): %s; retrying in %.1fs",
                    attempt,
                    attempts,
                    exc,
                    wait,
                )
                await asyncio.sleep(wait)
                delay = min(delay * 2, _BACKOFF_CAP)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _start(self, transport: Transport) -> None:
        assert self._lost is not None
        self._lost.clear()
        self._transport = transport
        for consumer in self.consumers:
            consumer.transport = transport
            await transport.declare(consumer.listener.topology(self.settings))
        self._subscriptions = []
        for consumer in self.consumers:
            subscription = await transport.consume(
                consumer.listener.queue, consumer.listener.concurrency, consumer.on_message
            )
            subscription.channel.close_callbacks.add(self._on_channel_closed)
            underlay = await subscription.channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._on_consumer_cancelled)
            self._subscriptions.append(subscription)
        transport.on_close(self._on_connection_closed)
        self.ready = True
        names = ", ".join(
            f"{c.listener.__name__} ({c.listener.queue}, concurrency {c.listener.concurrency})"
            for c in self.consumers
        )
        log.info(
            "worker pid=%d consuming on %s: %s", os.getpid(), self.settings.redacted_url, names
        )

    def _on_connection_closed(self, exc: BaseException | None) -> None:
        if not self._closing and self._lost is not None:
            log.warning("connection to the broker lost (%s)", _describe(exc))
            self._lost.set()

    def _on_channel_closed(self, _channel: object, exc: BaseException | None = None) -> None:
        # A consumer channel closed by the broker (consumer_timeout, queue deleted, ...)
        # would leave a live connection consuming nothing: start over on a new connection.
        if not self._closing and self._lost is not None and not self._lost.is_set():
            log.warning(
                "a consumer channel was closed by the broker (%s); reconnecting", _describe(exc)
            )
            self._lost.set()

    def _on_consumer_cancelled(self, frame: object) -> None:
        # The broker cancelled a consumer (its queue was deleted, a node went away): a live
        # connection that consumes nothing is the worst state to be in. Start over: the
        # topology is declared again and every queue consumed afresh.
        if not self._closing and self._lost is not None and not self._lost.is_set():
            log.warning("the broker cancelled a consumer (%s); reconnecting", frame)
            self._lost.set()

    async def _reconnect(self) -> Transport | None:
        assert self._stop is not None
        old = self._transport
        if old is not None:
            self._closing = True
            with contextlib.suppress(Exception):
                await old.close()
            self._closing = False
        delay = _BACKOFF_FIRST
        while not self._stop.is_set():
            transport: Transport | None = None
            try:
                transport = await Transport.connect(self.settings, name=self._connection_name)
                await self._start(transport)
            except Exception as exc:
                if transport is not None:
                    with contextlib.suppress(Exception):
                        await transport.close()
                wait = delay * random.uniform(0.5, 1.5)
                log.warning("reconnecting failed (%s); next try in %.1fs", exc, wait)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=wait)
                delay = min(delay * 2, _BACKOFF_CAP)
                continue
            log.info("reconnected to %s", self.settings.redacted_url)
            return transport
        return None

    def _fatal(self, reason: str) -> None:
        self.exit_code = 1
        self.request_stop(reason)

    async def _drain(self) -> None:
        self._closing = True
        self.ready = False
        for consumer in self.consumers:
            consumer.accepting = False
        for subscription in self._subscriptions:
            # A closed channel delivers nothing more anyway.
            with contextlib.suppress(Exception):
                await subscription.cancel()
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
                "%d message(s) did not finish within %gs; they go back to the queue unacked",
                len(pending),
                self.settings.grace_period,
            )
            settling = {task for consumer in self.consumers for task in consumer.settling}
            for task in pending - settling:
                task.cancel()
            await asyncio.wait(pending, timeout=_CANCEL_WAIT)
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()
        for consumer in self.consumers:
            consumer.stop_threads()
        log.info("worker pid=%d stopped: %r", os.getpid(), self)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    return f"{type(exc).__name__}: {exc}"
