"""One delivery of the in-memory broker, taken through the runner's own outcome code.

Decoding (`MessageCodec.decode`), the attempt number, the failure and the copy's headers
(`listener._settling`), the decision (`listener.outcome.decide`), the delay tier
(`listener.delay.steps`), the time-out of an async handler
(`listener.runner.execution.run_async`) and the middleware hooks are the runner's. Only the
carrying out differs: a retried or parked copy goes to an in-memory queue.

Sync handlers run on the calling thread (so `join()` runs them where the test runs) and are
never abandoned: one that outlives its `timeout` runs to its end, then counts as timed out.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from listener import outcome
from listener._memory_broker import Envelope, ParkedMessage, Store
from listener.codec import DecodeFailure, new_message_id
from listener.errors import Reject, Retry
from listener.middleware import Chain, Delivery
from listener.outcome import (
    Ack,
    Failure,
    RetryLater,
    attempt_number,
    carried_headers,
    copy_headers,
    decode_failure,
    failure_from,
    timeout_failure,
)
from listener.runner.execution import (
    AttemptTimedOut,
    HandlerExited,
    check_sync_result,
    run_async,
)

if TYPE_CHECKING:
    from listener.inbox import Inbox
    from listener.listener import Listener
    from listener.settings import Settings

__all__ = ["Deliveries"]

_HOST = socket.gethostname()

#: What an attempt ended with: its failure (None: handled), and the exception `handle()`
#: raised when it is one that `fail_fast` re-raises.
Result = tuple[Failure | None, Exception | None]


@dataclass(slots=True)
class _Run:
    listener: type[Listener]
    envelope: Envelope
    message_id: str
    attempt: int
    delivery: Delivery
    failure: Failure | None
    value: Any = None
    decoded: bool = False


class _Exited(Exception):
    """`handle()` raised SystemExit or KeyboardInterrupt (a worker would stop)."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(type(original).__name__)
        self.original = original


class Deliveries:
    """Runs deliveries taken from a `Store`, and settles them back into it."""

    def __init__(self, store: Store, chain: Chain) -> None:
        self.store = store
        self.chain = chain
        self.instances: dict[type[Listener], Listener] = {}
        #: Idempotent listeners' inboxes, once the broker has a database (`use_database`).
        self.inboxes: dict[type[Listener], Inbox] = {}
        self.settings: Settings | None = None

    def add(self, cls: type[Listener]) -> None:
        """Create the listener's instance, once, as a worker does when it starts."""
        if cls not in self.instances:
            self.instances[cls] = cls()
        if cls.idempotent and cls not in self.inboxes and self.settings is not None:
            from listener.inbox import Inbox

            self.inboxes[cls] = Inbox(cls, self.settings)

    def use_database(self, settings: Settings) -> None:
        """Run idempotent listeners with the inbox on `settings.database_url`."""
        self.settings = settings
        for cls in self.instances:
            self.add(cls)

    def _handle(self, run: _Run) -> Callable[[Any], Any]:
        cls = run.listener
        inbox = self.inboxes.get(cls)
        if inbox is not None:
            if cls.is_async and inbox.on_sqlite and _virtual_loop_running():
                # aiosqlite waits on a thread of its own, which the virtual clock cannot
                # see: it would jump to the time-out while the database works.
                raise TypeError(
                    f"{cls.__name__} is an async idempotent listener on SQLite: deliver with "
                    "`await broker.ajoin()`, whose clock is real, not with join()"
                )
            return inbox.bind(self.instances[cls], run.message_id)
        if cls.idempotent:
            raise TypeError(
                f"{cls.__name__} is idempotent: its handle() needs a database session. Give "
                "the broker the database: MemoryBroker(..., database_url=...)"
            )
        return self.instances[cls].handle

    def run(
        self,
        cls: type[Listener],
        envelope: Envelope,
        loop: Callable[[], asyncio.AbstractEventLoop],
    ) -> Exception | None:
        """One delivery on this thread; an async handler runs on `loop()`.

        Returns the exception `handle()` raised, if it failed with one.
        """
        run = self._begin(cls, envelope)
        failure, error = run.failure, None
        try:
            if failure is None:
                if cls.is_async:
                    failure, error = loop().run_until_complete(self._call_async(run))
                else:
                    failure, error = self._call_sync(run)
        except _Exited as exc:
            raise self._exited(run, exc) from exc.original
        self._finish(run, failure)
        return error

    async def arun(self, cls: type[Listener], envelope: Envelope) -> Exception | None:
        """One delivery on the running loop; a sync handler runs on a thread."""
        run = self._begin(cls, envelope)
        failure, error = run.failure, None
        try:
            if failure is None:
                if cls.is_async:
                    failure, error = await self._call_async(run)
                else:
                    failure, error = await asyncio.to_thread(self._call_sync, run)
        except _Exited as exc:
            raise self._exited(run, exc) from exc.original
        self._finish(run, failure)
        return error

    # -- the attempt ------------------------------------------------------------------------

    def _begin(self, cls: type[Listener], envelope: Envelope) -> _Run:
        # Publishers outside the framework may send no id; the copies need one.
        message_id = envelope.message_id or new_message_id()
        attempt, lost = attempt_number(
            envelope.headers, cls.max_attempts, delivery_limit=cls.delivery_limit()
        )
        delivery = Delivery(
            cls,
            message_id,
            attempt,
            envelope.headers,
            envelope.exchange,
            envelope.routing_key,
            False,
        )
        self.chain.before("before_handle", delivery)
        run = _Run(cls, envelope, message_id, attempt, delivery, lost)
        if lost is None:
            try:
                run.value = cls.codec.decode(
                    envelope.body, envelope.content_type, envelope.content_encoding
                )
                run.decoded = True
            except DecodeFailure as exc:
                run.failure = decode_failure(exc)
        return run

    def _call_sync(self, run: _Run) -> Result:
        cls = run.listener
        started = time.monotonic()
        result: Result = (None, None)
        try:
            check_sync_result(self._handle(run)(run.value))
        except (SystemExit, KeyboardInterrupt) as exc:
            raise _Exited(exc) from None
        except Exception as exc:
            result = (failure_from(exc), _error_of(exc))
        elapsed = time.monotonic() - started
        if elapsed > cls.timeout:
            # The runner would have given up on it at the deadline and dropped its result.
            return timeout_failure(
                f"handle() ran {elapsed:.3g}s, longer than its {cls.timeout:g}s timeout"
            ), None
        return result

    async def _call_async(self, run: _Run) -> Result:
        cls = run.listener
        try:
            await run_async(self._handle(run), run.value, cls.timeout)
        except AttemptTimedOut as exc:
            return timeout_failure(str(exc)), None
        except HandlerExited as exc:
            raise _Exited(exc.original) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the test itself is being cancelled: not the handler's failure
            inner = asyncio.CancelledError("handle() was cancelled from inside")
            return failure_from(inner), None
        except Exception as exc:
            return failure_from(exc), _error_of(exc)
        return None, None

    # -- the outcome ------------------------------------------------------------------------

    def _finish(self, run: _Run, failure: Failure | None) -> None:
        cls = run.listener
        decision = outcome.decide(
            failure,
            attempt=run.attempt,
            max_attempts=cls.max_attempts,
            retry_delays=cls.retry_delays,
            queue=cls.queue,
        )
        store = self.store
        if isinstance(decision, Ack):
            with store.lock:
                store.handled[cls].append(run.value)
                store.counts["handled"] += 1
            self._after(run, "handled", None)
            return
        assert failure is not None
        envelope = run.envelope
        headers = copy_headers(
            decision,
            failure,
            carried=carried_headers(
                envelope.headers, exchange=envelope.exchange, routing_key=envelope.routing_key
            ),
            previous=envelope.headers,
            listener=cls.name(),
            host=_HOST,
            pid=os.getpid(),
            now=store.clock.datetime,
        )
        # Moved through the default exchange, by queue name, as the runner moves copies.
        copy = Envelope(
            envelope.body,
            headers,
            run.message_id,
            envelope.content_type,
            envelope.content_encoding,
            "",
            cls.queue,
        )
        if isinstance(decision, RetryLater):
            delay = decision.delay
            with store.lock:
                store.enqueue(cls, copy, delay=delay)
                store.counts["retried"] += 1
            self.chain.after("on_retry", run.delivery, delay=delay, failure=failure)
            self._after(run, "retried", failure)
            return
        parked = ParkedMessage(
            message_id=run.message_id,
            body=envelope.body,
            message=run.value if run.decoded else _try_decode(cls, envelope),
            headers=headers,
            reason=decision.reason,
            exception_type=failure.exception_type,
            exception_message=str(headers["x-exception-message"]),
            attempts=decision.attempts,
            listener=cls,
        )
        with store.lock:
            store.parked[cls].append(parked)
            store.counts["parked"] += 1
        self.chain.after("on_park", run.delivery, reason=decision.reason, failure=failure)
        self._after(run, "parked", failure)

    def _after(self, run: _Run, result: str, failure: Failure | None) -> None:
        self.chain.after(
            "after_handle",
            run.delivery,
            outcome=result,
            failure=failure,
            duration=time.monotonic() - run.delivery.started,
        )

    def _exited(self, run: _Run, exc: _Exited) -> RuntimeError:
        # A worker would stop and the broker deliver the message again: it goes back.
        self.store.put_back(run.listener, run.envelope)
        self._after(run, "returned", None)
        return RuntimeError(
            f"{run.listener.__name__}.handle raised {type(exc.original).__name__}: a worker "
            "would stop here; the message is back at the head of the MemoryBroker's queue"
        )


def _error_of(exc: Exception) -> Exception | None:
    # Retry and Reject steer the outcome; they are not failures to re-raise.
    return None if isinstance(exc, Retry | Reject) else exc


def _try_decode(cls: type[Listener], envelope: Envelope) -> Any:
    try:
        return cls.codec.decode(envelope.body, envelope.content_type, envelope.content_encoding)
    except DecodeFailure:
        return None


def _virtual_loop_running() -> bool:
    from listener._virtual_loop import VirtualTimeLoop

    try:
        return isinstance(asyncio.get_running_loop(), VirtualTimeLoop)
    except RuntimeError:
        return False
