"""The `Listener` base class: what users subclass, and how a declaration is checked."""

from __future__ import annotations

import datetime as dt
import inspect
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from listener import delay as _delay
from listener import routing, topology
from listener import schedule as _schedule
from listener.codec import MessageCodec
from listener.errors import ListenerDefinitionError
from listener.recording import record_publish
from listener.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from listener.jobs import Job

__all__ = ["Listener"]

_MAX_CONCURRENCY = 65_535  # AMQP prefetch_count is a 16-bit field
#: Leaves room for the longest derived name, `<queue>.retry.<milliseconds>ms`.
_MAX_QUEUE_BYTES = 230


class Listener:
    """Subclass this, set `subscribes_to`, and write `handle()` (sync or `async def`).

    Example:
        class FileCopier(Listener):
            subscribes_to = "case_files.copy_requested"

            def handle(self, message: CopyRequest) -> None: ...

    Class attributes (all but `subscribes_to` have defaults):
        subscribes_to: `"<exchange>.<routing key>"`; the key may hold `*` and `#`.
        queue: the durable queue this class owns; default: the class name in snake_case,
            behind the `queue_prefix` setting.
        max_attempts: attempts in all, the first included, before a message is parked.
        retry_delays: seconds before attempt 2, 3, ...; the last value repeats.
        timeout: seconds one attempt may take; then it counts as failed.
        concurrency: messages in flight per worker process (the consumer prefetch).
        max_deliveries: deliveries without an outcome (the worker died, or its connection
            was lost, each time) after which a message is parked as `delivery_limit`, a
            backstop for deaths that blame cannot see; default (None): 3 x max_attempts,
            at most the queue's own delivery limit (20).
        idempotent: handle each message id once, atomically with the handler's database
            writes (`listener.inbox`); `handle(self, message, session)` then gets a
            SQLAlchemy session (an `AsyncSession` when it is `async def`).
        schedule / every: a cron expression or a `timedelta`: `amqp-listener run` sends the
            listener a message per tick (`schedule_message()`), from one elected scheduler.
        missed_ticks: "last" (fire the latest tick missed while no runner ran) or "skip".

    Pass `abstract=True` in the class statement for a base class that shares settings
    (`class Base(Listener, abstract=True)`): it needs no `subscribes_to` and is never hosted.
    """

    subscribes_to: ClassVar[str]
    queue: ClassVar[str]
    max_attempts: ClassVar[int] = 5
    retry_delays: ClassVar[tuple[float, ...]] = (1, 5, 30)
    timeout: ClassVar[float] = 60
    concurrency: ClassVar[int] = 8
    max_deliveries: ClassVar[int | None] = None
    idempotent: ClassVar[bool] = False
    schedule: ClassVar[str | None] = None
    every: ClassVar[dt.timedelta | None] = None
    missed_ticks: ClassVar[str] = "last"

    # Derived at class creation; read-only by convention.
    exchange: ClassVar[str]
    routing_key: ClassVar[str]
    message_type: ClassVar[Any]
    is_async: ClassVar[bool]
    codec: ClassVar[MessageCodec]
    __abstract__: ClassVar[bool] = True

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__abstract__ = abstract
        _check_policy(cls)
        if abstract:
            return
        settings = get_settings()
        _check_subscription(cls)
        _check_handle(cls, settings)
        own_queue = cls.__dict__.get("queue")
        if own_queue is None:
            cls.queue = topology.default_queue_name(cls.__name__, settings.queue_prefix)
        _check_queue_name(cls, derived=own_queue is None)
        _check_schedule(cls)
        from listener import registry

        registry.register(cls)

    if TYPE_CHECKING:
        # `handle(self, message)`, or `handle(self, message, session)` with `idempotent`:
        # typed loosely so that either signature type-checks in a subclass.
        handle: Callable[..., Any]
    else:

        def handle(self, message):
            """Handle one message. Return to ack it; raise to retry it (see the outcome
            table)."""
            raise NotImplementedError

    def track(self, message: Any) -> Iterable[str]:
        """Business keys the ledger files this message under, like `"Account:121"`.

        Runs where the message is notified and again in the worker (keep it a quick, pure
        function of the message). The default tracks nothing.
        """
        return ()

    # -- the ledger (needs a database: AMQP_LISTENER_DATABASE_URL) ---------------------------

    @classmethod
    def pending_jobs(cls, tag: str) -> list[Job]:
        """This listener's jobs tagged `tag` that have not finished: pending, running or
        retrying; newest last."""
        from listener import jobs

        return jobs.find(listener=cls, tag=tag, state=jobs.UNFINISHED)

    @classmethod
    def failed_jobs(cls, tag: str) -> list[Job]:
        """This listener's parked jobs tagged `tag`; newest last."""
        from listener import jobs

        return jobs.find(listener=cls, tag=tag, state="parked")

    @classmethod
    def schedule_message(cls, tick: dt.datetime) -> Any:
        """The message of the tick at `tick` (UTC) for a scheduled listener: by default an
        empty model, or the model's only field (a datetime) set to the tick."""
        return _schedule.default_message(cls, tick)

    # -- publishing -------------------------------------------------------------------------

    @classmethod
    def notify(
        cls,
        message: Any = None,
        /,
        *,
        routing_key: str | None = None,
        headers: dict[str, Any] | None = None,
        session: Session | None = None,
        ordering_key: str | None = None,
        delay: float | dt.timedelta | None = None,
        at: dt.datetime | None = None,
        **fields: Any,
    ) -> str:
        """Validate, publish and wait for the broker's confirm. Returns the message id.

        Pass a model instance, or its fields as keyword arguments. Thread-safe. With
        `delay=` seconds or `at=` an aware datetime, the broker holds the message and it
        reaches this listener's queue at that moment, never early (see `listener.delay`).

        With `session` (a SQLAlchemy `Session`), the message is written to the outbox in that
        session's transaction instead, and the id returned at once: the relay publishes it
        once the transaction commits, and never if it rolls back. `ordering_key` (outbox
        only) keeps the messages of one key in commit order. A delay with `session` counts
        from the commit.

        Raises:
            InvalidMessage: the message does not fit the model (nothing was sent).
            ValueError: a negative or too long delay, a naive or past `at`.
            PublishError: a subclass saying why the message is not safely with the broker.
        """
        body = cls.codec.encode(_message_value(cls, message, fields))
        if session is not None or ordering_key is not None:
            from listener import outbox

            exchange, key, headers = cls._outbox_route(routing_key, headers, delay, at)
            ids = outbox.write(
                session, exchange, key, [body], headers=headers, ordering_key=ordering_key
            )
            return ids[0]
        from listener.publisher import default_publisher

        exchange, key, headers = cls._route(routing_key, headers, delay, at)
        message_id = default_publisher().publish_body(exchange, key, body, headers=headers)
        record_publish(cls, (message_id,), (body,), headers)
        return message_id

    @classmethod
    async def anotify(
        cls,
        message: Any = None,
        /,
        *,
        routing_key: str | None = None,
        headers: dict[str, Any] | None = None,
        session: AsyncSession | Session | None = None,
        ordering_key: str | None = None,
        delay: float | dt.timedelta | None = None,
        at: dt.datetime | None = None,
        **fields: Any,
    ) -> str:
        """The asyncio twin of `notify()`; `session` is an `AsyncSession` (or a `Session`)."""
        body = cls.codec.encode(_message_value(cls, message, fields))
        if session is not None or ordering_key is not None:
            from listener import outbox

            exchange, key, headers = cls._outbox_route(routing_key, headers, delay, at)
            ids = await outbox.awrite(
                session, exchange, key, [body], headers=headers, ordering_key=ordering_key
            )
            return ids[0]
        from listener.apublisher import default_async_publisher

        exchange, key, headers = cls._route(routing_key, headers, delay, at)
        publisher = default_async_publisher()
        message_id = await publisher.publish_body(exchange, key, body, headers=headers)
        record_publish(cls, (message_id,), (body,), headers)
        return message_id

    @classmethod
    def notify_many(
        cls,
        messages: Iterable[Any],
        *,
        routing_key: str | None = None,
        session: Session | None = None,
        ordering_key: str | None = None,
        delay: float | dt.timedelta | None = None,
        at: dt.datetime | None = None,
    ) -> list[str]:
        """Publish a batch with pipelined confirms; returns the ids once all are confirmed.

        Every message is validated before the first is sent. If some fail, the first error
        is raised after all confirms are in; messages confirmed before it stay published.
        With `session`, the batch is written to the outbox as `notify()` does.
        `delay=` or `at=` applies to the whole batch (with `session`, from the commit).
        """
        bodies = [cls.codec.encode(m) for m in messages]
        if session is not None or ordering_key is not None:
            from listener import outbox

            exchange, key, headers = cls._outbox_route(routing_key, None, delay, at)
            return outbox.write(
                session, exchange, key, bodies, headers=headers, ordering_key=ordering_key
            )
        from listener.apublisher import run_in_background

        exchange, key, headers = cls._route(routing_key, None, delay, at)
        ids = run_in_background(
            lambda publisher: publisher.publish_bodies(exchange, key, bodies, headers=headers)
        )
        record_publish(cls, ids, bodies, headers)
        return ids

    @classmethod
    async def anotify_many(
        cls,
        messages: Iterable[Any],
        *,
        routing_key: str | None = None,
        session: AsyncSession | Session | None = None,
        ordering_key: str | None = None,
        delay: float | dt.timedelta | None = None,
        at: dt.datetime | None = None,
    ) -> list[str]:
        """The asyncio twin of `notify_many()`."""
        bodies = [cls.codec.encode(m) for m in messages]
        if session is not None or ordering_key is not None:
            from listener import outbox

            exchange, key, headers = cls._outbox_route(routing_key, None, delay, at)
            return await outbox.awrite(
                session, exchange, key, bodies, headers=headers, ordering_key=ordering_key
            )
        from listener.apublisher import default_async_publisher

        exchange, key, headers = cls._route(routing_key, None, delay, at)
        ids = await default_async_publisher().publish_bodies(exchange, key, bodies, headers=headers)
        record_publish(cls, ids, bodies, headers)
        return ids

    # -- description ------------------------------------------------------------------------

    @classmethod
    def name(cls) -> str:
        """`module:ClassName`, how logs, headers and the CLI name this listener."""
        return f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def delivery_limit(cls) -> int:
        """Deliveries without an outcome after which a message is parked (`max_deliveries`,
        or its default: 3 x `max_attempts`, at most the queue's delivery limit)."""
        if cls.max_deliveries is not None:
            return cls.max_deliveries
        return min(3 * cls.max_attempts, topology.DELIVERY_LIMIT)

    @classmethod
    def topology(cls, settings: Settings | None = None) -> topology.Topology:
        """The exchange, queues and binding this listener needs."""
        settings = settings or get_settings()
        return topology.describe(
            exchange=cls.exchange,
            binding_key=cls.routing_key,
            queue=cls.queue,
            retry_delays=cls.retry_delays,
            queue_type=settings.queue_type,
        )

    @classmethod
    def _route(
        cls,
        routing_key: str | None,
        headers: dict[str, Any] | None,
        delay: float | dt.timedelta | None,
        at: dt.datetime | None,
    ) -> tuple[str, str, dict[str, Any] | None]:
        """Exchange, key and headers of a notify: the listener's address, or, for a delay,
        the delay levels' entry, from where the broker takes it to this listener's queue."""
        key = cls._key_for(routing_key)
        if delay is None and at is None:  # the hot path: nothing more to build
            return cls.exchange, key, headers
        # Where the message was meant to go, for the headers of a retry or a park.
        original = {"x-original-exchange": cls.exchange, "x-original-routing-key": key}
        seconds = _delay.seconds_until(delay=delay, at=at)
        route = _delay.queue_route(cls.queue, {**original, **(headers or {})}, seconds)
        return route or (cls.exchange, key, headers)

    @classmethod
    def _outbox_route(
        cls,
        routing_key: str | None,
        headers: dict[str, Any] | None,
        delay: float | dt.timedelta | None,
        at: dt.datetime | None,
    ) -> tuple[str, str, dict[str, Any] | None]:
        """Exchange, key and headers of an outbox row: the listener's address, or, for a
        delay, its queue with the moment the message is due. The relay routes it through the
        delay levels when it publishes (`listener.relay`), so a message waits `delay` from
        the commit, not from whenever a relay got to it."""
        key = cls._key_for(routing_key)
        due = _delay.due_headers(headers, delay=delay, at=at)
        if due is headers:
            return cls.exchange, key, headers
        original = {"x-original-exchange": cls.exchange, "x-original-routing-key": key}
        return "", cls.queue, {**original, **(due or {})}

    @classmethod
    def _key_for(cls, routing_key: str | None) -> str:
        if routing_key is None:
            if routing.has_wildcard(cls.routing_key):
                raise ValueError(
                    f"{cls.__name__} subscribes to the pattern {cls.routing_key!r}: "
                    "pass a concrete routing_key='...' to notify()"
                )
            return cls.routing_key
        routing.validate_routing_key(routing_key)
        if not routing.topic_matches(cls.routing_key, routing_key):
            raise ValueError(
                f"routing key {routing_key!r} does not match {cls.__name__}'s binding "
                f"{cls.routing_key!r}: the message would not reach it"
            )
        return routing_key


def _message_value(cls: type[Listener], message: Any, fields: dict[str, Any]) -> Any:
    if message is not None and fields:
        raise TypeError(f"{cls.__name__}.notify() takes a message or keyword fields, not both")
    return fields if message is None else message


def _error(cls: type, attribute: str, problem: str) -> ListenerDefinitionError:
    return ListenerDefinitionError(f"{cls.__module__}.{cls.__qualname__}.{attribute} {problem}")


def _check_queue_name(cls: type[Listener], *, derived: bool) -> None:
    name = cls.queue
    source = " (from the queue_prefix setting)" if derived else ""
    if not isinstance(name, str) or not name:
        raise _error(cls, "queue", f"must be a non-empty string, got {name!r}")
    if name.startswith("amq."):
        raise _error(cls, "queue", f"{name!r}{source}: names starting with 'amq.' are reserved")
    if len(name.encode()) > _MAX_QUEUE_BYTES:
        raise _error(
            cls,
            "queue",
            f"{name[:40]!r}...{source} is longer than {_MAX_QUEUE_BYTES} bytes; the retry "
            "and dead-letter queues named after it must fit RabbitMQ's 255-byte limit",
        )


def _check_schedule(cls: type[Listener]) -> None:
    cron, every = cls.schedule, cls.every
    if cron is None and every is None:
        return
    if cron is not None and every is not None:
        raise _error(cls, "schedule", "and every are both set: choose one")
    if every is not None and (not isinstance(every, dt.timedelta) or every.total_seconds() < 1):
        raise _error(cls, "every", f"must be a timedelta of at least 1 second, got {every!r}")
    if cron is not None:
        try:
            from croniter import croniter
        except ImportError:  # pragma: no cover - the [cron] extra is missing
            raise _error(
                cls, "schedule", "needs the croniter package: pip install 'amqp-listener[cron]'"
            ) from None
        if not isinstance(cron, str) or len(cron.split()) != 5 or not croniter.is_valid(cron):
            raise _error(
                cls,
                "schedule",
                f"must be a cron expression of five fields (minute hour day month weekday), "
                f"such as '0 3 * * *'; got {cron!r}",
            )
    if cls.missed_ticks not in ("last", "skip"):
        raise _error(cls, "missed_ticks", f"must be 'last' or 'skip', got {cls.missed_ticks!r}")
    if cls.schedule_message.__func__ is Listener.schedule_message.__func__:  # type: ignore[attr-defined]
        problem = _schedule.check_message_model(cls)
        if problem is not None:
            raise _error(cls, "schedule_message", problem)


def _check_subscription(cls: type[Listener]) -> None:
    value = getattr(cls, "subscribes_to", None)
    if value is None:
        raise _error(cls, "subscribes_to", "is missing: set it to '<exchange>.<routing key>'")
    try:
        address = routing.parse_address(value)
    except ValueError as exc:
        raise _error(cls, "subscribes_to", f"is invalid: {exc}") from None
    cls.exchange, cls.routing_key = address


def _check_policy(cls: type[Listener]) -> None:
    def positive_int(attribute: str, upper: int) -> None:
        value = getattr(cls, attribute)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
            raise _error(cls, attribute, f"must be an integer from 1 to {upper}, got {value!r}")

    positive_int("max_attempts", 1_000_000)
    positive_int("concurrency", _MAX_CONCURRENCY)
    if cls.max_deliveries is not None:
        positive_int("max_deliveries", topology.DELIVERY_LIMIT)
    timeout = cls.timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise _error(cls, "timeout", f"must be a positive number of seconds, got {timeout!r}")
    delays = cls.retry_delays
    if isinstance(delays, int | float) and not isinstance(delays, bool):
        delays = (delays,)
    if (
        not isinstance(delays, Sequence)
        or isinstance(delays, str)
        or not all(
            isinstance(d, int | float) and not isinstance(d, bool) and 0 <= d <= topology.MAX_DELAY
            for d in delays
        )
    ):
        raise _error(
            cls,
            "retry_delays",
            f"must be a sequence of seconds from 0 to {topology.MAX_DELAY:g}, "
            f"got {cls.retry_delays!r}",
        )
    cls.retry_delays = tuple(float(d) for d in delays)


def _check_handle(cls: type[Listener], settings: Settings) -> None:
    handle = cls.__dict__.get("handle") or getattr(cls, "handle", None)
    if handle is None or handle is Listener.handle:
        raise _error(cls, "handle", "is missing: define handle(self, message)")
    if not inspect.isfunction(handle):
        raise _error(cls, "handle", "must be a plain method (def or async def)")
    parameters = list(inspect.signature(handle).parameters.values())[1:]
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [
        p
        for p in parameters[1:]
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if not isinstance(cls.idempotent, bool):
        raise _error(cls, "idempotent", f"must be True or False, got {cls.idempotent!r}")
    if cls.idempotent and (len(positional) < 2 or len(required) > 1):
        raise _error(
            cls,
            "handle",
            "of an idempotent listener must take two arguments besides self: the message and "
            "the database session, handle(self, message, session)",
        )
    if not cls.idempotent and (not positional or required):
        raise _error(
            cls,
            "handle",
            "must take exactly one argument besides self: the message (a second, the session, "
            "needs idempotent = True)",
        )
    try:
        hints = typing.get_type_hints(handle)
    except Exception as exc:  # NameError for a forward reference, TypeError for bad syntax
        raise _error(cls, "handle", f"has an annotation that cannot be resolved: {exc}") from None
    annotation = hints.get(positional[0].name)
    try:
        cls.codec = MessageCodec(annotation, max_body_bytes=settings.max_body_bytes)
    except Exception as exc:  # pydantic cannot build a validator for this type
        raise _error(
            cls,
            "handle",
            f"message annotation {annotation!r} is not a type pydantic can validate: {exc}",
        ) from None
    cls.message_type = annotation
    inner = inspect.unwrap(handle)
    if inspect.isasyncgenfunction(inner) or inspect.isgeneratorfunction(inner):
        raise _error(cls, "handle", "must not be a generator (it contains 'yield')")
    cls.is_async = inspect.iscoroutinefunction(handle) or inspect.iscoroutinefunction(inner)
