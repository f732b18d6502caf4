"""What an operator asks of the broker: how are the queues, what is parked and why,
send it back, throw it away. Plain data in, plain data out; the CLI and the web console
format it.

Parked messages are read by peeking (`listener._peek`): the dead-letter queue is streamed
unacked and handed back, with memory that follows the page asked for, not the queue. A
command killed half-way loses nothing: the broker takes back what it held. A peek leaves
`redelivered` set and counts in `x-delivery-count` (the dead queue's delivery limit,
`topology.PEEK_LIMIT`, can never be reached); a replay sends a fresh copy without either,
in one transaction with the parked message's ack (`listener._replay`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from listener import delay, registry, topology
from listener._operator_connection import OperationFailed, OperatorConnection, translating
from listener._peek import Peek
from listener._replay import Replaying
from listener._unrouted import Unrouted, UnroutedResult, send_on
from listener.errors import ConfigurationError, Unroutable
from listener.listener import Listener
from listener.management import ManagementAPI
from listener.parked import Page, Parked, ReplayResult, SortKey, sort_key
from listener.settings import Settings

__all__ = [
    "DelayStatus",
    "OperationFailed",
    "Operator",
    "Page",
    "Parked",
    "QueueStatus",
    "ReplayResult",
    "Target",
    "Unrouted",
    "UnroutedResult",
    "resolve_listener",
]


@dataclass(frozen=True, slots=True)
class Target:
    """What a TARGET argument names: a listener's queue and its dead-letter queue."""

    queue: str
    dead_queue: str
    listener: type[Listener] | None = None

    @property
    def name(self) -> str:
        return self.listener.name() if self.listener else self.queue


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One listener's queues, as `amqp-listener status` shows them."""

    listener: str
    queue: str
    ready: int | None
    consumers: int | None
    waiting_retry: int
    parked: int | None
    missing: bool = False
    unacked: int | None = None
    publish_rate: float | None = None
    ack_rate: float | None = None
    source: str = "amqp"


@dataclass(frozen=True, slots=True)
class DelayStatus:
    """The delay levels every listener shares, as `amqp-listener status` shows them."""

    #: `notify(delay=...)` and `Retry(delay=...)` messages not yet due, for all listeners.
    delayed: int
    #: Delayed messages that came due after their listener's queue was deleted.
    unrouted: int
    #: False when the levels were never declared on this virtual host.
    declared: bool = True


def resolve_listener(spec: str) -> type[Listener]:
    """`module:ClassName` -> the Listener class (the module is imported)."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigurationError(f"{spec!r} is not module:ClassName")
    module = registry.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Listener) and not cls.__abstract__):
        raise ConfigurationError(f"{module_name!r} defines no listener named {class_name!r}")
    return cls


class Operator:
    """A connection for operator commands (synchronous: it backs a CLI).

    Its methods raise amqp-listener's errors only: a broker or network failure on the way
    is an OperationFailed (`listener._operator_connection`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._broker = OperatorConnection(settings)
        self._connection = self._broker.connection

    def close(self) -> None:
        self._broker.close()

    def __enter__(self) -> Operator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- what is there --------------------------------------------------------------------

    @translating
    def target(self, spec: str) -> Target:
        """Resolve TARGET (`module:ClassName` or a queue name) to existing queues.

        Raises:
            ConfigurationError: unknown target. Nothing is ever declared here.
        """
        if ":" in spec:
            cls = resolve_listener(spec)
            target = Target(cls.queue, topology.dead_queue_name(cls.queue), cls)
        elif spec.endswith(".dead"):
            target = Target(spec.removesuffix(".dead"), spec)
        else:
            target = Target(spec, topology.dead_queue_name(spec))
        if self._broker.depth(target.dead_queue) is None:
            raise ConfigurationError(
                f"no dead-letter queue {target.dead_queue!r} on this broker: check the "
                "target (a listener as module:ClassName, or its queue name) and the vhost"
            )
        return target

    @translating
    def status(
        self,
        listeners: Sequence[type[Listener]] | None = None,
        *,
        absent: set[str] | None = None,
    ) -> list[QueueStatus]:
        """Depths and consumers of each listener's queues: from the management API when it
        answers (with unacked counts and rates), else from passive declares.

        Without `listeners`, the listener queues the management API shows (every queue with
        a `<queue>.dead` beside it); without that API, a ConfigurationError.

        `absent`, for a caller that asks again every few seconds (the web console): delay
        queues found missing are added to it, and those in it are not asked about again.
        Most of a status is such questions (the delay queues of earlier versions, which
        nothing declares any more), and each costs a channel.
        """
        # One request for every queue's counts, whatever the number of listeners (the web
        # console refreshes this every 5 s); no answer means AMQP alone.
        known: dict[str, dict[str, Any]] | None
        try:
            known = ManagementAPI.at(self.settings).queues()
        except (OSError, ValueError):
            known = None
        if listeners is None:
            if known is None:
                raise ConfigurationError(
                    "name the modules that define the listeners (AMQP cannot list queues), or "
                    "enable the management plugin so that status can find them"
                )
            queues: list[tuple[str, str, tuple[float, ...]]] = [
                (name, name, ()) for name in sorted(known) if f"{name}.dead" in known
            ]
        else:
            queues = [(cls.name(), cls.queue, cls.retry_delays) for cls in listeners]
        rows = []
        for label, queue, retry_delays in queues:
            detail = None if known is None else known.get(queue)
            main = self._broker.declare_ok(queue)
            waiting = 0
            for name in self._delay_queue_names(queue, retry_delays):
                if known is not None and name not in known:
                    continue  # the API lists every queue: no need to ask for a missing one
                if absent is not None and name in absent:
                    continue
                depth = self._broker.depth(name)
                if depth is None and absent is not None:
                    absent.add(name)
                waiting += depth or 0
            row = QueueStatus(
                listener=label,
                queue=queue,
                ready=None if main is None else main.message_count,
                consumers=None if main is None else main.consumer_count,
                waiting_retry=waiting,
                parked=self._broker.depth(topology.dead_queue_name(queue)),
                missing=main is None,
            )
            if detail is not None:
                stats = detail.get("message_stats") or {}
                row = dataclasses.replace(
                    row,
                    ready=detail.get("messages_ready", row.ready),
                    unacked=detail.get("messages_unacknowledged"),
                    consumers=detail.get("consumers", row.consumers),
                    publish_rate=(stats.get("publish_details") or {}).get("rate"),
                    ack_rate=(stats.get("ack_details") or {}).get("rate"),
                    source="management",
                )
            rows.append(row)
        return rows

    @translating
    def delay_status(self) -> DelayStatus:
        """How many messages wait in the shared delay levels, and how many found no
        listener when they came due."""
        depths = [self._broker.depth(delay.level_name(level)) for level in range(delay.LEVELS)]
        unrouted = self._broker.depth(delay.UNROUTED)
        return DelayStatus(
            delayed=sum(depth or 0 for depth in depths),
            unrouted=unrouted or 0,
            declared=unrouted is not None,
        )

    @translating
    def unrouted(self, *, limit: int = 100) -> tuple[int, list[Unrouted]]:
        """The delayed messages that came due after their listener's queue was deleted
        (`delay.UNROUTED`): how many there are, and the first `limit`, read and handed back."""
        total = self._broker.depth(delay.UNROUTED) or 0
        found: list[Unrouted] = []
        if total:
            with self._peeking(delay.UNROUTED) as messages:
                for _tag, parked in messages:
                    found.append(Unrouted.read(parked))
                    if len(found) >= limit:
                        break
        return total, found

    @translating
    def send_unrouted(self, *, limit: int | None = None) -> UnroutedResult:
        """Send the messages in `delay.UNROUTED` (at most `limit`) on to where they were
        going, each removed once the broker confirmed its copy; those whose destination
        still does not exist stay (`listener._unrouted`)."""
        if self._broker.depth(delay.UNROUTED) is None:
            return UnroutedResult()
        with self._peeking(delay.UNROUTED) as messages:
            return send_on(self._connection, messages, limit)

    # -- parked messages ------------------------------------------------------------------

    @translating
    def page(
        self,
        target: Target,
        *,
        limit: int | None = None,
        after: str | None = None,
        ids: Sequence[str] = (),
        exception: str | None = None,
        older_than: dt.timedelta | None = None,
        bodies: bool = False,
    ) -> Page:
        """One page of `target`'s parked messages, oldest first, filtered; nothing is removed.

        Only the `limit` oldest after the message `after` are kept (without their bodies
        unless `bodies`): memory follows the page, not the queue. The queue is read once, or
        twice with `after` (first to find where that message goes).

        Raises:
            OperationFailed: `after` names no parked message (it was replayed or purged).
        """
        cursor = self._sort_key_of(target, after) if after else None
        wanted = _Filter(ids, exception, older_than)
        kept: list[tuple[SortKey, Parked]] = []
        worst: SortKey | None = None
        total = beyond = 0
        with self._peeking(target.dead_queue) as messages:
            for _tag, parked in messages:
                if not wanted(parked):
                    continue
                total += 1
                key = sort_key(parked)
                if cursor is not None and key <= cursor:
                    continue
                beyond += 1
                if worst is not None and key >= worst:
                    continue  # later than the whole page kept so far
                kept.append((key, parked if bodies else parked.without_body()))
                if limit is not None and len(kept) >= 2 * limit + 100:
                    kept.sort(key=_first)
                    del kept[limit:]
                    worst = kept[-1][0]
        kept.sort(key=_first)
        shown = [parked for _, parked in kept[:limit]]
        more = limit is not None and beyond > len(shown)
        return Page(shown, total, shown[-1].message_id if more and shown else None)

    @translating
    def parked(
        self,
        target: Target,
        *,
        ids: Sequence[str] = (),
        exception: str | None = None,
        older_than: dt.timedelta | None = None,
    ) -> list[Parked]:
        """Every parked message of `target` that matches, oldest first, bodies included
        (all in memory: for a large queue, read it in pages with `page()`)."""
        return self.page(
            target, ids=ids, exception=exception, older_than=older_than, bodies=True
        ).messages

    @translating
    def find(self, target: Target, message_id: str) -> Parked | None:
        """The parked message `message_id`, whole; the read stops where it is found."""
        with self._peeking(target.dead_queue) as messages:
            for _tag, parked in messages:
                if parked.message_id == message_id:
                    return parked
        return None

    @translating
    def replay(
        self, target: Target, *, ids: Sequence[str] = (), limit: int | None = None
    ) -> ReplayResult:
        """Send parked messages back to the listener's queue, each with a fresh attempt count.

        Without `ids`, every one (or the `limit` oldest). The copy's publish and the parked
        message's ack are one AMQP transaction, committed every thousand messages: killed
        at any point, each message is either replayed or still parked, and never both
        (unless it was already parked twice).
        """
        chosen: set[str] | None = set(ids) if ids else None
        if chosen is None and limit is not None:
            chosen = {p.message_id for p in self.page(target, limit=limit).messages}
        if self._broker.declare_ok(target.queue) is None:
            raise Unroutable(
                f"the listener's queue {target.queue!r} does not exist, so nothing was "
                "replayed. Start the listener's runner once, or run `amqp-listener declare "
                "MODULE`",
                message_id="",
            )
        done: dict[str, SortKey] = {}
        try:
            with self._peeking(target.dead_queue, transactional=True) as messages:
                Replaying(self._connection, messages, target.queue, done).run(chosen)
        except Exception as exc:
            exc.partial_result = _result(done, ())  # type: ignore[attr-defined]
            raise
        return _result(done, sorted((chosen or set()) - set(done)) if ids else ())

    @translating
    def purge(self, target: Target, *, ids: Sequence[str] = ()) -> ReplayResult:
        """Delete parked messages: those named by `ids`, or all of them."""
        chosen = set(ids)
        done: dict[str, SortKey] = {}
        with self._peeking(target.dead_queue) as messages:
            channel = messages.channel
            for tag, parked in messages:
                if chosen and parked.message_id not in chosen:
                    continue
                channel.basic_ack(tag)
                done.setdefault(parked.message_id, sort_key(parked))
        return _result(done, sorted(chosen - set(done)))

    # -- plumbing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _peeking(self, queue: str, *, transactional: bool = False) -> Iterator[Peek]:
        """Read `queue` without removing what is not acked (see `listener._peek`), holding
        the operator lock on it."""
        unlock = self._broker.lock(queue)
        peek = Peek(self._connection, queue, transactional=transactional)
        try:
            yield peek
        finally:
            peek.hand_back()
            unlock()

    def _sort_key_of(self, target: Target, message_id: str) -> SortKey:
        found = self.find(target, message_id)
        if found is None:
            raise OperationFailed(
                f"no parked message with id {message_id!r} in {target.dead_queue!r} to list "
                "after (it was replayed or purged since): start again from the first page"
            )
        return sort_key(found)

    @translating
    def peek_latest(self, queue: str) -> bytes | None:
        """The body of the one message a length-one queue holds, handed back at once; None
        when the queue is empty or missing."""
        return self._broker.peek_latest(queue)

    def _delay_queue_names(self, queue: str, retry_delays: Sequence[float]) -> list[str]:
        declared = {topology.delay_queue_name(queue, d) for d in retry_delays if d > 0}
        ladder = {topology.delay_queue_name(queue, d) for d in topology.DELAY_LADDER}
        return sorted(declared | ladder)


class _Filter:
    """Which parked messages a command is about: by id, exception type and age."""

    def __init__(
        self, ids: Sequence[str], exception: str | None, older_than: dt.timedelta | None
    ) -> None:
        self.ids = frozenset(ids)
        self.exception = exception
        self.older_than = older_than
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self, parked: Parked) -> bool:
        if self.ids and parked.message_id not in self.ids:
            return False
        if self.exception and self.exception not in parked.exception_type:
            return False
        return self.older_than is None or parked.age(self.now) >= self.older_than


def _first(item: tuple[SortKey, Parked]) -> SortKey:
    return item[0]


def _result(done: dict[str, SortKey], not_found: Sequence[str]) -> ReplayResult:
    # Reported oldest first, as listed, whatever order the queue held them in.
    return ReplayResult(sorted(done, key=done.__getitem__), list(not_found))
