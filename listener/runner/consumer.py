"""One listener's deliveries: decode, run `handle()`, decide the outcome, carry it out.

`_settle` is the single place where a delivery is acked, moved to a retry queue or parked.
Acks happen only after `handle()` returned (at-least-once: if the worker dies first, the
broker redelivers). A retry or a park is a confirmed publish of a copy *followed by* the
ack of the original, so a crash between the two can duplicate a message but never lose it.

The consumer speaks to the broker only through a `DeliveryTransport`
(`listener.runner.transport`): RabbitMQ's in a worker, the in-memory one of
`listener.testing`, which drives this same class, so that both settle alike.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from listener import _outgoing, outcome
from listener.codec import DecodeFailure, new_message_id
from listener.errors import PublishError, Unroutable
from listener.middleware import Chain, Delivery, installed_middleware
from listener.outcome import Ack, Failure, RetryLater
from listener.runner.execution import (
    AttemptTimedOut,
    HandlerExited,
    HandlerThreads,
    run_async,
)

if TYPE_CHECKING:
    from listener.inbox import Inbox
    from listener.listener import Listener
    from listener.runner.blame import Isolation
    from listener.runner.transport import DeliveryTransport as Transport
    from listener.runner.transport import Incoming as Inbound
    from listener.settings import Settings

#: How `handle()` is called: `(handle, message, timeout)`, raising `AttemptTimedOut` past the
#: timeout and `HandlerExited` for SystemExit or KeyboardInterrupt.
HandlerCall = Callable[[Callable[[Any], Any], Any, float], Awaitable[Any]]

__all__ = ["Consumer", "HandlerCall"]

log = logging.getLogger("listener.worker")

_HOST = socket.gethostname()
#: Wait before handing a message back when it could not be moved, so that a broker that
#: keeps refusing does not turn into a hot redelivery loop.
_SETTLE_RETRY_PAUSE = 1.0
#: A redelivered message this runner knows nothing of, delivered this many times without
#: an outcome, runs alone as a suspect would: its deaths (a whole runner killed, the
#: supervisor included) left no journal. One lost connection (one redelivery) never does.
UNSEEN_DEATHS_ALONE = 2
#: Seconds such a message waits, at random up to this, before it queues to run alone: the
#: messages a restarted runner is handed back then run in a random order, so that a poison
#: that kills the whole runner does not run first every time and starve the innocent ones.
_UNSEEN_SHUFFLE = 0.25


class Consumer:
    """Consumes one listener's queue inside a worker process."""

    def __init__(
        self,
        listener: type[Listener],
        transport: Transport,
        *,
        settings: Settings,
        on_fatal: Callable[[str], None],
        chain: Chain | None = None,
        on_stuck: Callable[[], None] | None = None,
        isolation: Isolation | None = None,
        call: HandlerCall | None = None,
        inbox: bool = True,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        """The last three are for the in-memory test kit: `call` runs `handle()` (default:
        an async one on the loop, a sync one on a thread of `HandlerThreads`), `inbox=False`
        leaves an idempotent listener without its inbox, and `clock` stamps failure headers
        (default: the wall clock)."""
        self.listener = listener
        #: The worker's journal, gate and suspects, when it runs under a supervisor.
        self.isolation = isolation
        self._delivery_limit = listener.delivery_limit()
        self.transport = transport
        self.settings = settings
        self.chain = chain or Chain(installed_middleware())
        self._on_stuck = on_stuck
        self._instance = listener()
        self._on_fatal = on_fatal
        self._threads = (
            None
            if listener.is_async or call is not None
            else HandlerThreads(f"{listener.__name__}-handler")
        )
        threads = self._threads
        self._call: HandlerCall = call or (run_async if threads is None else threads.run)
        self._clock = clock or _utcnow
        self._known_queues: set[str] = {spec.name for spec in listener.topology(settings).queues}
        self.inbox: Inbox | None = None
        if listener.idempotent and inbox:  # imported only here: the database is an optional extra
            from listener.inbox import Inbox

            self.inbox = Inbox(listener, settings)
        self.in_flight: set[asyncio.Task[None]] = set()
        #: Deliveries whose outcome is being carried out: the drain lets these finish rather
        #: than cancel them half-way (a copy published, the original not yet acked).
        self.settling: set[asyncio.Task[None]] = set()
        self.accepting = True
        self.counts = {"handled": 0, "retried": 0, "parked": 0, "failed": 0}

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"<Consumer {self.listener.__name__} {counts} in_flight={len(self.in_flight)}>"

    @property
    def stuck_threads(self) -> int:
        """Sync handler threads abandoned after a time-out and still running."""
        return self._threads.stuck if self._threads else 0

    def on_message(self, message: Inbound) -> None:
        """The consumer callback: run one delivery to its outcome, in a task of its own."""
        task = asyncio.get_running_loop().create_task(self._run(message))
        self.in_flight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self.settling.discard(task)

    async def _run(self, message: Inbound) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            if not self.accepting:
                # Arrived after the drain began: not started, so handed straight back.
                self.settling.add(task)
                await self._hand_back(message)
                return
            await self._process(message)
        except asyncio.CancelledError:
            # The grace period is over and the worker is stopping: not the handler's
            # failure. Hand the message back before the connection closes. (A lost
            # connection cancels nothing: the attempt runs on, and its outcome is dropped
            # because the broker has the message back already.)
            task.uncancel()
            await self._hand_back(message)
            raise
        except Exception:
            # A bug or a broker refusal outside the outcome table (a failing declare, say).
            # Never leave the delivery hanging: it would hold a prefetch slot for good.
            log.exception(
                "%s: unexpected error while handling message %s; it goes back to its queue",
                self.listener.__name__,
                message.message_id,
            )
            await asyncio.sleep(_SETTLE_RETRY_PAUSE)
            if not await self._hand_back(message):
                self._requeue(message)

    async def _process(self, message: Inbound) -> None:
        listener = self.listener
        # Publishers outside the framework may send no id; parked messages need one, stable
        # from here on (the copies keep it).
        properties = message.properties
        given = str(properties.message_id) if properties.message_id else None
        message_id = given or new_message_id()
        headers = message.headers
        isolation = self.isolation
        identity = given or _digest(message.body)
        deaths = None
        unseen = False
        if message.redelivered and isolation is not None:
            # A message that was running when a worker of this runner died: it runs alone.
            deaths = isolation.deaths(listener.queue, identity)
            if deaths is None and "x-delivery-count" in headers:
                unseen = outcome.deliveries_lost(headers) >= UNSEEN_DEATHS_ALONE
        attempt, lost = outcome.attempt_number(
            headers, listener.max_attempts, deaths=deaths or 0, delivery_limit=self._delivery_limit
        )
        delivery = Delivery(
            listener,
            message_id,
            attempt,
            headers,
            message.exchange or "",
            message.routing_key or "",
            bool(message.redelivered),
        )
        self.chain.before("before_handle", delivery)
        failure: Failure | None = None
        result = "returned"
        # Under a supervisor every attempt passes the worker's gate: a suspect runs alone,
        # from its decode to its settling (an ack still unsent when it kills the worker
        # would make the message before it run again).
        gate = isolation.gate if isolation is not None and lost is None else None
        alone = deaths is not None or unseen
        try:
            if gate is not None:
                if alone:
                    if unseen:
                        log.warning(
                            "%s: message %s was delivered %d times without an outcome "
                            "(a runner or a connection lost); it runs alone",
                            listener.__name__,
                            message_id,
                            outcome.deliveries_lost(headers),
                        )
                        await asyncio.sleep(random.uniform(0, _UNSEEN_SHUFFLE))
                    else:
                        log.warning(
                            "%s: message %s was running when a worker died; it runs alone",
                            listener.__name__,
                            message_id,
                        )
                    await gate.enter_alone()
                    try:
                        await self.transport.wait_sent()
                    except BaseException:
                        gate.leave_alone()
                        raise
                else:
                    if gate.suspects:
                        await gate.wait_open()
                    gate.running += 1
            try:
                if lost is not None:
                    failure = lost
                else:
                    # The journal says what runs now; an entry is left behind only when
                    # the handler made the worker exit, for the supervisor to read.
                    journal = isolation.journal if isolation is not None else None
                    entry = (
                        journal.begin(listener.queue, identity, delivery.started)
                        if journal is not None
                        else -1
                    )
                    fatal = False
                    try:
                        failure = await self._attempt(message, message_id, delivery)
                    except _LeaveUnacked:
                        fatal = True
                        return
                    finally:
                        if journal is not None and not fatal:
                            journal.end(entry)
                decision = outcome.decide(
                    failure,
                    attempt=attempt,
                    max_attempts=listener.max_attempts,
                    retry_delays=listener.retry_delays,
                    queue=listener.queue,
                )
                task = asyncio.current_task()
                assert task is not None
                self.settling.add(task)
                result = await self._settle(message, message_id, decision, failure, delivery)
            finally:
                if gate is not None:
                    if alone:
                        gate.leave_alone()
                    else:
                        gate.leave()
        finally:
            self.chain.after(
                "after_handle",
                delivery,
                outcome=result,
                failure=failure,
                duration=time.monotonic() - delivery.started,
            )

    async def _attempt(
        self, message: Inbound, message_id: str, delivery: Delivery
    ) -> Failure | None:
        listener = self.listener
        try:
            value = listener.codec.decode(
                message.body, message.properties.content_type, message.properties.content_encoding
            )
        except DecodeFailure as exc:
            return outcome.decode_failure(exc)
        delivery.message = value
        handle: Callable[[Any], Any] = self._instance.handle
        if self.inbox is not None:  # the same call, inside the inbox's transaction
            handle = self.inbox.bind(self._instance, message_id)
        try:
            await self._call(handle, value, listener.timeout)
        except AttemptTimedOut as exc:
            if self._threads is not None and self._on_stuck is not None:
                self._on_stuck()
            return outcome.timeout_failure(str(exc))
        except HandlerExited as exc:
            log.error(
                "%s: handle() called %s on message %s; stopping this worker, the message goes "
                "back to the queue",
                listener.__name__,
                type(exc.original).__name__,
                message_id,
            )
            self._on_fatal(f"{listener.__name__}.handle raised {type(exc.original).__name__}")
            raise _LeaveUnacked from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # The worker is stopping: not the handler's failure. Left unacked, the
                # message is redelivered.
                raise
            return outcome.failure_from(
                asyncio.CancelledError("handle() was cancelled from inside")
            )
        except Exception as exc:  # Retry and Reject included: outcomes, not failures
            return outcome.failure_from(exc)
        return None

    async def _settle(
        self,
        message: Inbound,
        message_id: str,
        decision: outcome.Outcome,
        failure: Failure | None,
        delivery: Delivery,
    ) -> str:
        """Carry out `decision`. The only place that acks, retries or parks a delivery.

        Returns what became of it: `handled`, `retried`, `parked` or `returned`.
        """
        listener = self.listener
        if isinstance(decision, Ack):
            if not self._ack(message, message_id):
                return "returned"  # the broker delivers it again: counted then
            self.counts["handled"] += 1
            return "handled"
        assert failure is not None
        if message.channel_closed:
            # The connection died during the attempt: the broker has already put the
            # message back, and moving a copy now would only duplicate it.
            log.warning(
                "%s: message %s finished after its channel closed; the broker will "
                "deliver it again",
                listener.__name__,
                message_id,
            )
            return "returned"
        headers = outcome.copy_headers(
            decision,
            failure,
            carried=_carried_headers(message),
            previous=message.headers,
            listener=listener.name(),
            host=_HOST,
            pid=os.getpid(),
            now=self._clock(),
        )
        target = decision.queue
        try:
            await self._move(message, message_id, target, headers)
        except PublishError as exc:
            log.error(
                "%s: could not move message %s to %s (%s); it stays in %s and will be "
                "delivered again",
                listener.__name__,
                message_id,
                target,
                exc,
                listener.queue,
            )
            await asyncio.sleep(_SETTLE_RETRY_PAUSE)
            self._requeue(message)
            return "returned"
        self._ack(message, message_id)
        if isinstance(decision, RetryLater):
            self.counts["retried"] += 1
            self.chain.after("on_retry", delivery, delay=decision.delay, failure=failure)
            return "retried"
        self.counts["parked"] += 1
        self.chain.after("on_park", delivery, reason=decision.reason, failure=failure)
        return "parked"

    async def _move(
        self,
        message: Inbound,
        message_id: str,
        target: str,
        headers: dict[str, Any],
    ) -> None:
        # The copy keeps the body and properties byte for byte, except `expiration` and
        # `user_id` (see `listener._outgoing.KEPT_PROPERTIES`).
        copy = _outgoing.copy_of(
            message.properties, message.body, message_id=message_id, headers=headers
        )
        try:
            await self.transport.publish_to_queue(target, copy)
        except Unroutable:
            # The target queue vanished (deleted by hand?): declare the topology again, once.
            topology = self.listener.topology(self.settings)
            await self.transport.declare(topology, again=True)
            self._known_queues.update(spec.name for spec in topology.queues)
            await self.transport.publish_to_queue(target, copy)

    def _ack(self, message: Inbound, message_id: str) -> bool:
        """Settle `message`; False when its channel died since the delivery (its tag means
        nothing on a new channel, and the broker has put the message back already)."""
        if message.ack():
            return True
        log.warning(
            "%s: ack for message %s dropped (its channel closed); the broker will deliver it again",
            self.listener.__name__,
            message_id,
        )
        return False

    async def _hand_back(self, message: Inbound) -> bool:
        """Return a message that got no outcome (the worker is stopping) to its queue.

        A confirmed copy then an ack, rather than a requeue: RabbitMQ counts a requeued or
        unacked-at-close delivery in `x-delivery-count`, which the framework reads as "the
        worker died", and a deploy is not a death. If the copy cannot be made, the message is
        left unacked and the broker requeues it when the connection closes.

        Returns:
            False when the message is still unsettled on a live channel.
        """
        message_id = message.message_id or new_message_id()
        if message.processed:
            return True  # settled already, or the broker has it back already
        try:
            await self._move(message, message_id, self.listener.queue, _carried_headers(message))
        except Exception as exc:
            log.warning(
                "%s: could not hand message %s back (%s); the broker requeues it",
                self.listener.__name__,
                message_id,
                type(exc).__name__,
            )
            return False
        self._ack(message, message_id)
        return True

    def _requeue(self, message: Inbound) -> None:
        # If the channel is gone the broker has requeued it already.
        message.nack(requeue=True)


class _LeaveUnacked(Exception):
    """The attempt ended because the worker is stopping: no outcome, the broker redelivers."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _digest(body: bytes) -> str:
    """What names a delivery without a message id across its redeliveries (blame needs a
    name that stays): a digest of its body."""
    return "sha256:" + hashlib.sha256(body).hexdigest()[:32]


def _carried_headers(message: Inbound) -> dict[str, Any]:
    return outcome.carried_headers(
        message.headers,
        exchange=message.exchange,
        routing_key=message.routing_key,
        expiration=message.properties.expiration,
    )
