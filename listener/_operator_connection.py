"""The operator commands' connection to the broker: what `listener.operations` asks of it
besides reading parked messages (`listener._peek`) and replaying them (`listener._replay`):
passive declares, the operator lock, a look at a queue's one message.

This is the pika boundary of the operator commands: `translating` turns every pika (and
socket) error raised inside an operation into an OperationFailed that says what to check,
so the CLI and the web console see only amqp-listener's own errors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import pika
import pika.exceptions

from listener import _nodes
from listener._amqp_errors import operator_error
from listener.errors import BrokerError
from listener.settings import Settings

__all__ = ["OperationFailed", "OperatorConnection", "translated", "translating"]

P = ParamSpec("P")
T = TypeVar("T")


class OperationFailed(BrokerError):
    """An operator command could not do its work (the queue is busy, access refused, the
    connection was lost); the text says what to check."""


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Raise pika's and the socket's errors as OperationFailed (`from` the original). What a
    replay had done before the error (`partial_result`) goes along."""
    try:
        yield
    except (pika.exceptions.AMQPError, OSError) as exc:
        error = operator_error(exc, OperationFailed)
        partial = getattr(exc, "partial_result", None)
        if partial is not None:
            error.partial_result = partial  # type: ignore[attr-defined]
        raise error from exc


def translating(method: Callable[P, T]) -> Callable[P, T]:
    """`method`, its errors `translated()`."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        with translated():
            return method(*args, **kwargs)

    return call


class OperatorConnection:
    """One blocking pika connection, opened to the first node that answers."""

    def __init__(self, settings: Settings) -> None:
        def open_one(node: _nodes.Node) -> pika.BlockingConnection:
            parameters = _nodes.pika_parameters(settings, node, "amqp-listener operator")
            parameters.blocked_connection_timeout = settings.confirm_timeout
            return pika.BlockingConnection(parameters)

        with translated():
            self.connection: pika.BlockingConnection = _nodes.connect(
                settings, open_one, what="operator"
            )
        self._declaring: Any = None  # the channel of the passive declares

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()

    def lock(self, queue: str) -> Callable[[], None]:
        """Hold `<queue>.operator-lock`, an exclusive queue (the broker drops it with this
        connection, if the command dies): two commands peeking one queue at once would each
        see only part of it. Returns the release."""
        lock = f"{queue}.operator-lock"
        channel = self.connection.channel()
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

    def peek_latest(self, queue: str) -> bytes | None:
        """The body of the one message a length-one queue holds, handed back at once; None
        when the queue is empty or missing."""
        channel = self.connection.channel()
        try:
            method, _properties, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                return None
            assert method.delivery_tag is not None
            channel.basic_nack(method.delivery_tag, requeue=True)
            return body if isinstance(body, bytes) else None
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise
        finally:
            if channel.is_open:
                channel.close()

    def declare_ok(self, queue: str) -> Any:
        """The answer to a passive declare of `queue` (its depth and consumers), or None
        when it does not exist.

        One channel serves the declares until a missing queue closes it (`status` asks
        about hundreds of queues: a channel each tripled the round trips)."""
        if self._declaring is None or not self._declaring.is_open:
            self._declaring = self.connection.channel()
        try:
            return self._declaring.queue_declare(queue, passive=True).method
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._declaring = None
            if exc.reply_code == 404:
                return None
            raise

    def depth(self, queue: str) -> int | None:
        """How many messages `queue` holds; None when it does not exist."""
        method = self.declare_ok(queue)
        return None if method is None else int(method.message_count)
