"""The one place where pika, aio-pika and aiormq exceptions become amqp-listener's own.

Each translation names what went wrong and what to check next, and is raised `from` the
original so the cause stays in the traceback. URLs are shown only through `redact_url`.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import TypeVar

import aiormq.exceptions
import pika.exceptions

from listener.errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerUnreachable,
    PublishConnectionLost,
    PublishError,
    PublishNacked,
    PublishRefused,
    PublishTimeout,
    PublishUnreachable,
    TopologyMismatch,
    Unroutable,
)

__all__ = [
    "connect_error",
    "consume_error",
    "declare_error",
    "is_connection_lost",
    "operator_error",
    "publish_error",
]

E = TypeVar("E", bound=BaseException)
B = TypeVar("B", bound=BrokerError)

_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for (\w+) '([^']+)'")
_NOT_FOUND_EXCHANGE = re.compile(r"no exchange '([^']*)'")

#: Exceptions meaning "the connection or channel is gone", from either client.
_LOST = (
    ConnectionError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ChannelWrongStateError,
    pika.exceptions.ChannelClosed,
    pika.exceptions.ConnectionWrongStateError,
)


def connect_error(
    exc: BaseException, redacted_url: str, *, publishing: bool = False, external: bool = False
) -> BrokerError:
    """Translate a failure to open a connection (either client).

    With `publishing`, the error is also a PublishError, so that `except PublishError`
    around `notify()` catches every way a message can fail to reach the broker. With
    `external`, the login was the client certificate's (EXTERNAL), not a password.
    """
    error = _connect_error(exc, redacted_url)
    if external and isinstance(error, AuthenticationFailed):
        error = AuthenticationFailed(
            f"the broker at {redacted_url} refused the EXTERNAL login by client certificate: "
            "check that it offers EXTERNAL (the rabbitmq_auth_mechanism_ssl plugin, "
            "auth_mechanisms), that a user named as the certificate's subject (or common "
            "name, per ssl_cert_login_from) exists, and AMQP_LISTENER_TLS_CERT_FILE"
        )
    if not publishing:
        return error
    if isinstance(error, AuthenticationFailed):
        return PublishRefused(str(error))
    return PublishUnreachable(str(error))


def _connect_error(exc: BaseException, redacted_url: str) -> BrokerError:
    text = _text(exc)
    if isinstance(
        exc, pika.exceptions.ProbableAuthenticationError | pika.exceptions.ProbableAccessDeniedError
    ) and not _broker_refused(exc):
        # pika calls any connection lost during the login "probably" a refusal; only a
        # close frame from the broker (403/530) really is one. A network cut is not.
        return BrokerUnreachable(
            f"the connection to {redacted_url} was lost during the handshake ({_cause(exc)}): "
            "check the network path to RabbitMQ, and its logs"
        )
    if isinstance(
        exc,
        aiormq.exceptions.ProbableAuthenticationError
        | aiormq.exceptions.AuthenticationError
        | pika.exceptions.ProbableAuthenticationError
        | pika.exceptions.AuthenticationError,
    ):
        return AuthenticationFailed(
            f"the broker at {redacted_url} refused the login: check the user name and "
            "password in AMQP_URL (or --url)"
        )
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError) or (
        isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in text
    ):
        return AuthenticationFailed(
            f"the broker at {redacted_url} refused access to the virtual host: check that "
            "the vhost in the URL exists and that the user has permissions on it"
        )
    refused = _nested(exc, ssl.SSLCertVerificationError)
    if refused is not None:
        return BrokerUnreachable(_certificate_message(refused, redacted_url))
    handshake = _nested(exc, ssl.SSLError)
    if handshake is not None:
        why = handshake.reason or type(handshake).__name__
        return BrokerUnreachable(
            f"TLS handshake with {redacted_url} failed ({why}): "
            "check the CA certificate, the host name and that the port speaks TLS"
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return BrokerUnreachable(
            f"connecting to {redacted_url} timed out: check the host, the port and firewalls"
        )
    return BrokerUnreachable(
        f"cannot connect to {redacted_url} ({_cause(exc)}): check that RabbitMQ is running "
        "and that host and port are right"
    )


#: OpenSSL's verify codes that mean "signed by a CA this client does not trust".
_UNKNOWN_CA = {2, 18, 19, 20, 21}
_HOSTNAME_MISMATCH = 62


def _nested(exc: BaseException, kind: type[E]) -> E | None:
    """The exception of type `kind` behind `exc`, however a client wrapped it (pika nests
    TLS errors in the arguments of its connection errors)."""
    seen: list[object] = [exc]
    for _ in range(20):
        if not seen:
            return None
        found = seen.pop()
        if isinstance(found, kind):
            return found
        if isinstance(found, BaseException):
            seen += [*found.args, found.__cause__, found.__context__]
        elif isinstance(found, list | tuple):
            seen += found
    return None


def _certificate_message(refused: ssl.SSLCertVerificationError, redacted_url: str) -> str:
    why = refused.verify_message or refused.reason or "refused"
    if refused.verify_code == _HOSTNAME_MISMATCH:
        return (
            f"TLS: the broker's certificate at {redacted_url} does not name the host connected "
            f"to (hostname mismatch: {why.rstrip('.')}): use a host name the certificate "
            "lists, or reissue the certificate"
        )
    if refused.verify_code in _UNKNOWN_CA:
        return (
            f"TLS: the broker's certificate at {redacted_url} is signed by an unknown CA "
            f"({why}): set AMQP_LISTENER_TLS_CA_FILE to the CA certificate that signed it"
        )
    return f"TLS: the broker's certificate at {redacted_url} was refused ({why})"


def declare_error(exc: BaseException) -> BrokerError:
    """Translate a failure while declaring exchanges, queues or bindings."""
    text = _text(exc)
    match = _INEQUIVALENT.search(text)
    if match:
        argument, kind, name = match.groups()
        return TopologyMismatch(
            f"{kind} {name!r} already exists with a different {argument!r} "
            f"({text.split(': ', 1)[-1].rstrip(chr(34))}). RabbitMQ cannot change it in place: "
            f"move its messages away and delete it, or declare it as it is"
        )
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return BrokerError(
            f"the broker refused to declare topology ({text}): give the user configure "
            "permission on these names, or declare them with an admin user "
            "(amqp-listener declare)"
        )
    return BrokerError(f"declaring topology failed: {_cause(exc)}")


def consume_error(exc: BaseException, queue: str) -> BrokerError:
    """Translate a refused basic.consume (or the channel set-up before it)."""
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return BrokerError(
            f"the broker refused to consume queue {queue!r} ({_text(exc)}): another client "
            "may hold it exclusively, or the user lacks read permission on it"
        )
    if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
        return BrokerError(f"queue {queue!r} does not exist (deleted while starting?)")
    return BrokerError(f"consuming queue {queue!r} failed: {_cause(exc)}")


def publish_error(
    exc: BaseException, *, exchange: str, routing_key: str, message_id: str
) -> PublishError:
    """Translate a failed publish (either client) into the PublishError family."""
    where = (
        f"exchange {exchange!r} with routing key {routing_key!r}"
        if exchange
        else (f"queue {routing_key!r}")
    )
    if isinstance(exc, pika.exceptions.ConnectionBlockedTimeout):
        return PublishTimeout(
            f"the broker blocked publishing (a memory or disk alarm) and message {message_id} "
            "was not confirmed in time. Outcome unknown; check `rabbitmq-diagnostics alarms`",
            message_id=message_id,
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return PublishTimeout(
            f"no confirm for message {message_id} to {where} in time. Outcome unknown: it "
            "may be queued; publishing it again may duplicate it (same message id)",
            message_id=message_id,
        )
    if isinstance(exc, pika.exceptions.UnroutableError | aiormq.exceptions.PublishError):
        return Unroutable(
            f"message {message_id} was returned unroutable: no queue is bound to {where}. "
            "Start the listener's runner once, or run `amqp-listener declare MODULE`",
            message_id=message_id,
        )
    if isinstance(exc, pika.exceptions.NackError | aiormq.exceptions.DeliveryError):
        return PublishNacked(
            f"the broker nacked message {message_id} for {where}: it did not take it; "
            "publishing it again is safe",
            message_id=message_id,
        )
    text = _text(exc)
    match = _NOT_FOUND_EXCHANGE.search(text)
    if match:
        return Unroutable(
            f"exchange {match.group(1)!r} does not exist, so message {message_id} was not "
            "published. Start the listener's runner once, or run `amqp-listener declare MODULE`",
            message_id=message_id,
        )
    if "PRECONDITION_FAILED" in text or _reply_code(exc) == 406:
        return PublishError(
            f"the broker refused message {message_id} for {where}: {text}", message_id=message_id
        )
    if is_connection_lost(exc):
        return PublishConnectionLost(
            f"the connection was lost before message {message_id} was confirmed ({_cause(exc)}). "
            "Outcome unknown: it may or may not be queued; publishing it again may duplicate it",
            message_id=message_id,
        )
    return PublishError(
        f"publishing message {message_id} failed: {_cause(exc)}", message_id=message_id
    )


def operator_error(exc: BaseException, kind: type[B]) -> B:
    """Translate a failure during an operator command (`status`, `dead ...`, the web
    console's actions) into `kind`."""
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        if exc.reply_code == 403:
            return kind(
                f"the broker refused access ({exc.reply_text}): the user needs read and write "
                "permission on the queues, and configure permission on '<queue>.operator-lock'"
            )
        return kind(f"the broker refused ({exc.reply_code} {exc.reply_text})")
    return kind(
        f"the connection to the broker was lost ({type(exc).__name__}); nothing parked is "
        "lost: the broker takes back what the command held. Run it again"
    )


def _reply_code(exc: BaseException) -> int | None:
    """The AMQP reply code of a channel or connection close, when `exc` carries one."""
    for arg in exc.args:
        if isinstance(arg, int):
            return arg
    match = re.match(r"\(?(\d{3})\)?", _text(exc))
    return int(match.group(1)) if match else None


def _broker_refused(exc: BaseException) -> bool:
    inner = " ".join(str(arg) for arg in exc.args)
    return any(code in inner for code in ("ACCESS_REFUSED", "NOT_ALLOWED", "(403)", "(530)"))


def is_connection_lost(exc: BaseException) -> bool:
    """Whether `exc` means the connection or channel is gone (so re-open and go on)."""
    return isinstance(exc, _LOST)


def _text(exc: BaseException) -> str:
    if exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc) or repr(exc)


def _cause(exc: BaseException) -> str:
    name, text = type(exc).__name__, _text(exc)
    return text if text.startswith(name) else f"{name}: {text}"
