"""What an operator asks of the broker: how are the queues, what is parked and why,
send it back, throw it away. Plain data in, plain data out; the CLI formats it.

AMQP cannot browse a queue, so parked messages are *peeked*: the whole queue is taken
without acks, read, and handed back at once with `basic.nack(requeue=True)` (or by the
broker when the connection closes, if the command is killed). The dead-letter queue is
declared with a delivery limit that can never be reached (`topology.PEEK_LIMIT`): RabbitMQ
then serves handed-back messages first, in the order they came back, so a complete peek
keeps the queue's order, and messages parked meanwhile stay behind the older ones. A peek
killed half-way loses nothing but may rotate the queue; listings are sorted by parking
time in any case. A peek leaves `redelivered` set and counts in `x-delivery-count`; a replay
sends a fresh copy without either.

A replay publishes a copy to the listener's queue, waits for the broker's confirm, and only
then acks the parked message: killed half-way, a replay may leave a message both replayed
and parked (a duplicate, same `message_id`), never neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.adapters.blocking_connection
import pika.exceptions
import pika.spec

from listener import _nodes, outcome, registry, topology
from listener._amqp_errors import publish_error
from listener.errors import BrokerError, ConfigurationError
from listener.listener import Listener
from listener.management import ManagementAPI
from listener.settings import Settings

__all__ = [
    "OperationFailed",
    "Operator",
    "Parked",
    "QueueStatus",
    "ReplayResult",
    "Target",
    "resolve_listener",
]

#: Headers a replay drops: the failure record of the attempts before, and the broker's
#: counters. The body, the message id and the other properties are kept.
_RESET_ON_REPLAY = (
    frozenset(
        {
            "x-attempts",
            "x-parked-reason",
            "x-exception-type",
            "x-exception-message",
            "x-exception-traceback",
            "x-first-failure-at",
            "x-last-failure-at",
            "x-host",
            "x-pid",
        }
    )
    | outcome.BROKER_HEADERS
)
REPLAYS_HEADER = "x-replays"

Channel = pika.adapters.blocking_connection.BlockingChannel


class OperationFailed(BrokerError):
    """An operator command could not do its work (the queue is busy, access refused, the
    connection was lost); the text says what to check."""


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
class Parked:
    """A parked message, as read from the dead-letter queue."""

    message_id: str
    reason: str
    attempts: int | None
    exception_type: str
    exception_message: str
    listener: str
    parked_at: str
    first_failure_at: str
    host: str
    pid: int | None
    peeks: int
    replays: int
    headers: dict[str, Any] = field(repr=False)
    properties: dict[str, Any] = field(repr=False)
    body: bytes = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The one-line view (what `dead list` shows)."""
        return {
            "id": self.message_id,
            "parked_at": self.parked_at,
            "attempts": self.attempts,
            "reason": self.reason,
            "exception": self.exception_type,
            "message": self.exception_message,
        }


@dataclass(slots=True)
class ReplayResult:
    """What a replay or purge did: the ids it moved, and the ids asked for but not found."""

    done: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


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
    """A connection for operator commands (synchronous: it backs a CLI)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

        def open_one(node: _nodes.Node) -> pika.BlockingConnection:
            parameters = _nodes.pika_parameters(settings, node, "amqp-listener operator")
            parameters.blocked_connection_timeout = settings.confirm_timeout
            return pika.BlockingConnection(parameters)

        self._connection = _nodes.connect(settings, open_one, what="operator")
        self._channel: Channel | None = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._connection.close()

    def __enter__(self) -> Operator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- what is there --------------------------------------------------------------------

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
        if self._depth(target.dead_queue) is None:
            raise ConfigurationError(
                f"no dead-letter queue {target.dead_queue!r} on this broker: check the "
                "target (a listener as module:ClassName, or its queue name) and the vhost"
            )
        return target

    def status(self, listeners: Sequence[type[Listener]] | None = None) -> list[QueueStatus]:
        """Depths and consumers of each listener's queues: from the management API when it
        answers (with unacked counts and rates), else from passive declares.

        Without `listeners`, the listener queues the management API shows (every queue with
        a `<queue>.dead` beside it); without that API, a ConfigurationError.
        """
        api = ManagementAPI.probe(self.settings)
        if listeners is None:
            if api is None:
                raise ConfigurationError(
                    "name the modules that define the listeners (AMQP cannot list queues), or "
                    "enable the management plugin so that status can find them"
                )
            names = set(api.queue_names())
            queues: list[tuple[str, str, tuple[float, ...]]] = [
                (name, name, ()) for name in sorted(names) if f"{name}.dead" in names
            ]
        else:
            queues = [(cls.name(), cls.queue, cls.retry_delays) for cls in listeners]
        rows = []
        for label, queue, retry_delays in queues:
            detail = None
            if api is not None:
                # The probe answered, but a later call may still fail (rights on this vhost,
                # a restart): that row falls back to what AMQP can tell.
                with contextlib.suppress(OSError, ValueError):
                    detail = api.queue(queue)
            main = self._declare_ok(queue)
            waiting = 0
            for name in self._delay_queue_names(queue, retry_delays):
                depth = self._depth(name)
                waiting += depth or 0
            row = QueueStatus(
                listener=label,
                queue=queue,
                ready=None if main is None else main.message_count,
                consumers=None if main is None else main.consumer_count,
                waiting_retry=waiting,
                parked=self._depth(topology.dead_queue_name(queue)),
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

    # -- parked messages ------------------------------------------------------------------

    def parked(
        self,
        target: Target,
        *,
        ids: Sequence[str] = (),
        exception: str | None = None,
        older_than: dt.timedelta | None = None,
    ) -> list[Parked]:
        """The parked messages of `target`, oldest first, filtered; nothing is removed."""
        now = dt.datetime.now(dt.UTC)
        found = []
        with self._peeking(target.dead_queue) as messages:
            for _tag, parked in messages:
                if ids and parked.message_id not in ids:
                    continue
                if exception and exception not in parked.exception_type:
                    continue
                if older_than is not None and _age(parked, now) < older_than:
                    continue
                found.append(parked)
        found.sort(key=_sort_key)
        return found

    def replay(
        self, target: Target, *, ids: Sequence[str] = (), limit: int | None = None
    ) -> ReplayResult:
        """Send parked messages back to the listener's queue, each with a fresh attempt count.

        Without `ids`, the oldest first (up to `limit`). A parked message is acked (removed)
        only after its copy was confirmed.
        """
        channel = self._peek_channel()
        result = ReplayResult()
        try:
            with self._peeking(target.dead_queue) as messages:
                chosen = _choose(list(messages), ids, limit, result)
                for tags, parked in chosen:
                    # One replay per message id: copies parked twice (a killed move or
                    # replay) leave together, once the one replay was confirmed.
                    self._publish_replay(channel, target.queue, parked)
                    for tag in tags:
                        channel.basic_ack(tag)
                    result.done.append(parked.message_id)
        except Exception as exc:
            exc.partial_result = result  # type: ignore[attr-defined]
            raise
        return result

    def purge(self, target: Target, *, ids: Sequence[str] = ()) -> ReplayResult:
        """Delete parked messages: those named by `ids`, or all of them."""
        channel = self._peek_channel()
        result = ReplayResult()
        with self._peeking(target.dead_queue) as messages:
            for tags, parked in _choose(list(messages), ids, None, result):
                for tag in tags:
                    channel.basic_ack(tag)
                result.done.append(parked.message_id)
        return result

    # -- plumbing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _peeking(self, queue: str) -> Iterator[Iterator[tuple[int, Parked]]]:
        """Yield the messages now in `queue`, unacked; hand back every one not acked."""
        channel = self._peek_channel()
        unlock = self._lock(queue)
        taken: list[int] = []

        def messages() -> Iterator[tuple[int, Parked]]:
            # Every message taken stays unacked until the end, so none is read twice and
            # the loop ends when the queue is empty.
            while True:
                method, properties, body = channel.basic_get(queue, auto_ack=False)
                if method is None or method.delivery_tag is None or properties is None:
                    return
                tag = int(method.delivery_tag)
                taken.append(tag)
                data = body if isinstance(body, bytes) else (body or "").encode()
                yield tag, _parked(properties, data)

        try:
            yield messages()
        finally:
            if taken and channel.is_open:
                # Everything not acked goes back where it was (the dead queue's delivery
                # limit keeps the place); if this fails the connection's close does it.
                with contextlib.suppress(Exception):
                    channel.basic_nack(0, multiple=True, requeue=True)
            unlock()

    def _lock(self, queue: str) -> Callable[[], None]:
        """Hold `<queue>.operator-lock`, an exclusive queue (the broker drops it with this
        connection, if the command dies): two commands peeking one queue at once would each
        see only part of it. Returns the release."""
        lock = f"{queue}.operator-lock"
        channel = self._connection.channel()
        try:
            channel.queue_declare(lock, exclusive=True, auto_delete=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 405:
                raise OperationFailed(
                    f"another amqp-listener command is working on {queue!r} (it holds "
                    f"{lock!r}); try again when it is done"
                ) from None
            raise

        def release() -> None:
            with contextlib.suppress(Exception):
                channel.queue_delete(lock)
                channel.close()

        return release

    def _publish_replay(self, channel: Channel, queue: str, parked: Parked) -> None:
        headers = {k: v for k, v in parked.headers.items() if k not in _RESET_ON_REPLAY}
        replays = parked.replays + 1
        headers[REPLAYS_HEADER] = replays
        headers["x-replayed-at"] = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        properties = pika.BasicProperties(
            **{**parked.properties, "headers": headers, "delivery_mode": 2}
        )
        try:
            channel.basic_publish("", queue, parked.body, properties, mandatory=True)
        except Exception as exc:
            raise publish_error(
                exc, exchange="", routing_key=queue, message_id=parked.message_id
            ) from exc

    def _peek_channel(self) -> Channel:
        if self._channel is None or self._channel.is_closed:
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        return self._channel

    def _confirm_channel(self) -> Channel:
        # Replays publish on the peeking channel: its acks then follow the confirms in order.
        return self._peek_channel()

    def _declare_ok(self, queue: str) -> Any:
        channel = self._connection.channel()
        try:
            return channel.queue_declare(queue, passive=True).method
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise
        finally:
            if channel.is_open:
                channel.close()

    def _depth(self, queue: str) -> int | None:
        method = self._declare_ok(queue)
        return None if method is None else int(method.message_count)

    def _delay_queue_names(self, queue: str, retry_delays: Sequence[float]) -> list[str]:
        declared = {topology.delay_queue_name(queue, d) for d in retry_delays if d > 0}
        ladder = {topology.delay_queue_name(queue, d) for d in topology.DELAY_LADDER}
        return sorted(declared | ladder)


def _parked(properties: pika.spec.BasicProperties, body: bytes) -> Parked:
    headers = dict(properties.headers or {})
    kept = {
        name: getattr(properties, name)
        for name in (
            "content_type",
            "content_encoding",
            "priority",
            "correlation_id",
            "reply_to",
            "message_id",
            "timestamp",
            "type",
            "app_id",
        )
        if getattr(properties, name) is not None
    }
    return Parked(
        message_id=str(properties.message_id or ""),
        reason=_text(headers.get("x-parked-reason")) or _broker_reason(headers),
        attempts=_int(headers.get("x-attempts")),
        exception_type=_text(headers.get("x-exception-type")),
        exception_message=_text(headers.get("x-exception-message")),
        listener=_text(headers.get("x-listener")),
        parked_at=(
            _text(headers.get("x-last-failure-at"))
            or _death_time(headers)
            or _stamp(properties.timestamp)
        ),
        first_failure_at=_text(headers.get("x-first-failure-at")),
        host=_text(headers.get("x-host")),
        pid=_int(headers.get("x-pid")),
        peeks=_int(headers.get("x-delivery-count")) or 0,
        replays=_int(headers.get(REPLAYS_HEADER)) or 0,
        headers=headers,
        properties=kept,
        body=body,
    )


def _choose(
    taken: list[tuple[int, Parked]],
    ids: Sequence[str],
    limit: int | None,
    result: ReplayResult,
) -> list[tuple[list[int], Parked]]:
    """The messages a replay or purge acts on: those named, or the oldest (up to `limit`),
    each with the delivery tags of every copy of it (same message id).

    The whole queue is always taken first and everything else handed back together: a
    quorum queue keeps handed-back messages in the order they come back, so only a
    complete hand-back leaves the queue in its order.
    """
    groups: dict[str, tuple[list[int], Parked]] = {}
    for tag, parked in taken:
        key = parked.message_id or f"<no id, tag {tag}>"
        if key in groups:
            groups[key][0].append(tag)
        else:
            groups[key] = ([tag], parked)
    ordered = sorted(groups.values(), key=lambda group: _sort_key(group[1]))
    if ids:
        wanted = set(ids)
        chosen = [group for group in ordered if group[1].message_id in wanted]
        result.not_found = sorted(wanted - {parked.message_id for _, parked in chosen})
    else:
        chosen = ordered
    return chosen[:limit] if limit is not None else chosen


def _sort_key(parked: Parked) -> tuple[int, str]:
    # Oldest first; a message with no known parking time goes last, not first.
    return (0, parked.parked_at) if parked.parked_at else (1, "")


def _death_time(headers: dict[str, Any]) -> str:
    # Dead-lettered by the broker itself: x-death holds when.
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        when = deaths[0].get("time")
        if isinstance(when, dt.datetime):
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)
            return when.isoformat(timespec="milliseconds")
    return ""


def _broker_reason(headers: dict[str, Any]) -> str:
    # Dead-lettered by RabbitMQ itself (the work queue's delivery-limit backstop).
    reason = _text(headers.get("x-first-death-reason"))
    return f"broker:{reason}" if reason else "unknown"


def _age(parked: Parked, now: dt.datetime) -> dt.timedelta:
    try:
        when = dt.datetime.fromisoformat(parked.parked_at)
    except ValueError:
        return dt.timedelta(0)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return now - when


def _stamp(timestamp: int | None) -> str:
    if not timestamp:
        return ""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value
