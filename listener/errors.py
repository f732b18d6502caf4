"""Every exception amqp-listener raises, and the two a handler raises to steer its outcome.

    ListenerError                      root: catch this to catch everything below
    ├── ListenerDefinitionError        a Listener subclass is declared wrongly (at import)
    ├── ConfigurationError             a setting, module path or CLI option is unusable
    ├── InvalidMessage                 notify() got a value that does not fit the model
    ├── BrokerError                    talking to RabbitMQ failed
    │   ├── BrokerUnreachable          no TCP connection (host, port, TLS, firewall)
    │   ├── AuthenticationFailed       user, password or vhost refused (not transient)
    │   └── TopologyMismatch           a queue/exchange exists with other arguments
    └── PublishError                   a message is not known to be safely with the broker
        ├── Unroutable                 no queue is bound for the exchange and routing key
        ├── PublishNacked              the broker refused to take responsibility (basic.nack)
        ├── PublishTimeout             no confirm in time: outcome unknown
        ├── PublishConnectionLost      the connection died before the confirm: outcome unknown
        ├── PublishUnreachable         no connection for publishing (also a BrokerUnreachable)
        └── PublishRefused             the login was refused (also an AuthenticationFailed)

    Retry(delay=...)   raise in handle(): try again after `delay` seconds (counts as an attempt)
    Reject(reason)     raise in handle(): park the message now, no more attempts

Messages say what went wrong and what to check next. They never hold a password or a
message body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "AuthenticationFailed",
    "BrokerError",
    "BrokerUnreachable",
    "ConfigurationError",
    "InvalidMessage",
    "ListenerDefinitionError",
    "ListenerError",
    "PublishConnectionLost",
    "PublishError",
    "PublishNacked",
    "PublishRefused",
    "PublishTimeout",
    "PublishUnreachable",
    "Reject",
    "Retry",
    "TopologyMismatch",
    "Unroutable",
]


class ListenerError(Exception):
    """Root of every error amqp-listener raises."""


class ListenerDefinitionError(ListenerError, TypeError):
    """Raised at import when a Listener subclass is declared wrongly.

    The message names the class and the attribute at fault.
    """


class ConfigurationError(ListenerError):
    """Raised when a setting, a module path or a command-line option cannot be used."""


class InvalidMessage(ListenerError, ValueError):
    """Raised by `notify()` when the message does not fit the listener's model.

    The text names the fields and what is wrong with them, never the values given.
    `errors()` gives the same per field, for an API to answer with a 422 listing them.
    """

    def __init__(self, message: str, errors: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(message)
        self._errors = [
            {"loc": tuple(error["loc"]), "type": str(error["type"]), "msg": str(error["msg"])}
            for error in errors
        ]

    def errors(self) -> list[dict[str, Any]]:
        """One dict per field error: `loc` (a tuple of field names and list indexes),
        `type` (pydantic's error type, such as `missing` or `int_parsing`) and `msg`.
        Never the input values, which may be secrets."""
        return [dict(error) for error in self._errors]

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self._errors))


class BrokerError(ListenerError):
    """Raised when talking to RabbitMQ failed."""


class BrokerUnreachable(BrokerError):
    """Raised when no connection to the broker could be opened."""


class AuthenticationFailed(BrokerError):
    """Raised when the broker refused the user, the password or the vhost.

    Retrying does not help, so the runner exits at once on it.
    """


class TopologyMismatch(BrokerError):
    """Raised when a queue or exchange already exists with other arguments.

    RabbitMQ never changes an existing queue's arguments: delete the queue (after moving its
    messages) or declare it as it is.
    """


class PublishError(ListenerError):
    """Raised when a published message is not known to be safely with the broker.

    Attributes:
        message_id: the id of the message concerned, to look for it or publish it again
            (the consumer side sees the same id, so a re-publish can be de-duplicated).
    """

    def __init__(self, text: str, *, message_id: str | None = None) -> None:
        super().__init__(text)
        self.message_id = message_id


class Unroutable(PublishError):
    """Raised when the broker returned the message: no queue is bound for its routing key.

    Usually the listener's runner has never started (nothing declared the queue and its
    binding yet): run `amqp-listener declare MODULE` once at deploy time.
    """


class PublishNacked(PublishError):
    """Raised when the broker answered basic.nack: it did not take the message."""


class PublishTimeout(PublishError):
    """Raised when no confirm came in time. The outcome is unknown: the message may be queued."""


class PublishConnectionLost(PublishError):
    """Raised when the connection died before the confirm came. The outcome is unknown."""


class PublishUnreachable(PublishError, BrokerUnreachable):
    """Raised by a publish when no connection could be opened: the message was not sent."""


class PublishRefused(PublishError, AuthenticationFailed):
    """Raised by a publish when the broker refused the login or vhost: not sent."""


class Retry(Exception):
    """Raise this in `handle()` to try the message again after `delay` seconds.

    It counts as an attempt: after `max_attempts` the message is parked.
    """

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        # 2**32-1 ms is the longest TTL RabbitMQ accepts for the delay queue.
        if delay is not None and not 0 <= delay <= 4_294_967:
            raise ValueError(f"Retry delay must be 0 to 4294967 seconds, got {delay!r}")
        super().__init__(reason)
        self.delay = delay
        self.reason = reason

    def __repr__(self) -> str:
        return f"Retry(delay={self.delay!r}, reason={self.reason!r})"


class Reject(Exception):
    """Raise this in `handle()` to park the message at once, with `reason`, and not retry it."""

    def __init__(self, reason: str = "rejected by the handler") -> None:
        super().__init__(reason)
        self.reason = reason

    def __repr__(self) -> str:
        return f"Reject({self.reason!r})"
