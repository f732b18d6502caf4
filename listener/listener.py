"""The `Listener` base class: what users subclass, and how a declaration is checked."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from listener import routing, topology
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
        idempotent: handle each message id once, atomically with the handler's database
            writes (`listener.inbox`); `handle(self, message, session)` then gets a
            SQLAlchemy session (an `AsyncSession` when it is `async def`).

    Pass `abstract=True` in the class statement for a base class that shares settings
    (`class Base(Listener, abstract=True)`): it needs no `subscribes_to` and is never hosted.
    """

    subscribes_to: ClassVar[str]
    queue: ClassVar[str]
    max_attempts: ClassVar[int] = 5
    retry_delays: ClassVar[tuple[float, ...]] = (1, 5, 30)
    timeout: ClassVar[float] = 60
    concurrency: ClassVar[int] = 8
    idempotent: ClassVar[bool] = False

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
        **fields: Any,
    ) -> str:
        """Validate, publish and wait for the broker's confirm. Returns the message id.

        Pass a model instance, or its fields as keyword arguments. Thread-safe.

        With `session` (a SQLAlchemy `Session`), the message is written to the outbox in that
        session's transaction instead, and the id returned at once: the relay publishes it
        once the transaction commits, and never if it rolls back. `ordering_key` (outbox
        only) keeps the messages of one key in commit order.

        Raises:
            InvalidMessage: the message does not fit the model (nothing was sent).
            PublishError: a subclass saying why the message is not safely with the broker.
        """
        body = cls.codec.encode(_message_value(cls, message, fields))
        key = cls._key_for(routing_key)
        if session is not None or ordering_key is not None:
            from listener import outbox

            ids = outbox.write(
                session, cls.exchange, key, [body], headers=headers, ordering_key=ordering_key
            )
            return ids[0]
        from listener.publisher import default_publisher

        message_id = default_publisher().publish_body(cls.exchange, key, body, headers=headers)
        record_publish(cls, (message_id,), (body,))
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
        **fields: Any,
    ) -> str:
        """The asyncio twin of `notify()`; `session` is an `AsyncSession` (or a `Session`)."""
        body = cls.codec.encode(_message_value(cls, message, fields))
        key = cls._key_for(routing_key)
        if session is not None or ordering_key is not None:
            from listener import outbox

            ids = await outbox.awrite(
                session, cls.exchange, key, [body], headers=headers, ordering_key=ordering_key
            )
            return ids[0]
        from listener.apublisher import default_async_publisher

        publisher = default_async_publisher()
        message_id = await publisher.publish_body(cls.exchange, key, body, headers=headers)
        record_publish(cls, (message_id,), (body,))
        return message_id

    @classmethod
    def notify_many(
        cls,
        messages: Iterable[Any],
        *,
        routing_key: str | None = None,
        session: Session | None = None,
        ordering_key: str | None = None,
    ) -> list[str]:
        """Publish a batch with pipelined confirms; returns the ids once all are confirmed.

        Every message is validated before the first is sent. If some fail, the first error
        is raised after all confirms are in; messages confirmed before it stay published.
        With `session`, the batch is written to the outbox as `notify()` does.
        """
        bodies = [cls.codec.encode(m) for m in messages]
        key = cls._key_for(routing_key)
        if session is not None or ordering_key is not None:
            from listener import outbox

            return outbox.write(session, cls.exchange, key, bodies, ordering_key=ordering_key)
        from listener.apublisher import run_in_background

        ids = run_in_background(
            lambda publisher: publisher.publish_bodies(cls.exchange, key, bodies)
        )
        record_publish(cls, ids, bodies)
        return ids

    @classmethod
    async def anotify_many(
        cls,
        messages: Iterable[Any],
        *,
        routing_key: str | None = None,
        session: AsyncSession | Session | None = None,
        ordering_key: str | None = None,
    ) -> list[str]:
        """The asyncio twin of `notify_many()`."""
        bodies = [cls.codec.encode(m) for m in messages]
        key = cls._key_for(routing_key)
        if session is not None or ordering_key is not None:
            from listener import outbox

            return await outbox.awrite(
                session, cls.exchange, key, bodies, ordering_key=ordering_key
            )
        from listener.apublisher import default_async_publisher

        ids = await default_async_publisher().publish_bodies(cls.exchange, key, bodies)
        record_publish(cls, ids, bodies)
        return ids

    # -- description ------------------------------------------------------------------------

    @classmethod
    def name(cls) -> str:
        """`module:ClassName`, how logs, headers and the CLI name this listener."""
        return f"{cls.__module__}:{cls.__qualname__}"

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
