"""The broker nodes named by `AMQP_URL`, tried in a random order until one answers.

Several comma-separated URLs name the nodes of one cluster. Every connection the framework
opens (a worker's pair, the publishers', the operator's) is opened through `connect` or
`aconnect`: the list is shuffled, so that many clients spread over the nodes, and when a
node does not answer the next one is tried. A refused login is not tried elsewhere: the
nodes of a cluster share their users, so the next node would refuse it too.

`amqps://` URLs get a TLS context built from the `tls_*` settings, verifying the server's
certificate and host name; there is no fallback to plaintext. With `?auth_mechanism=external`
an `amqps://` URL logs in with the client certificate (`tls_cert_file`) instead of a password.
"""

from __future__ import annotations

import functools
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika
import pika.credentials

from listener._amqp_errors import connect_error
from listener.errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerUnreachable,
    ConfigurationError,
    PublishUnreachable,
)
from listener.settings import Settings, redact_url

__all__ = [
    "Node",
    "aconnect",
    "check_login",
    "connect",
    "in_turn",
    "pika_parameters",
    "ssl_context",
]

log = logging.getLogger("listener.nodes")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Node:
    """One broker URL of the list."""

    url: str  # holds the password: never print it
    host: str
    port: int
    tls: bool
    #: Log in with the client certificate (EXTERNAL), not a password.
    external: bool = False

    @property
    def redacted(self) -> str:
        shown = redact_url(self.url)
        if self.external:
            shown += ("&" if urlsplit(shown).query else "?") + "auth_mechanism=external"
        return shown

    @property
    def aiormq_url(self) -> str:
        """The URL for aio-pika, which reads the login mechanism from its `auth` query."""
        if not self.external:
            return self.url
        return self.url + ("&" if urlsplit(self.url).query else "?") + "auth=external"

    def __repr__(self) -> str:
        return f"<Node {self.redacted}>"


def nodes(settings: Settings) -> list[Node]:
    """The nodes, in the order the settings list them."""
    found = []
    for url in settings.urls:
        parts = urlsplit(url)
        tls = parts.scheme == "amqps"
        port = parts.port or (5671 if tls else 5672)
        # `auth_mechanism` is RabbitMQ's URI query parameter; neither client reads it (pika
        # refuses it): it is taken out here, and told to each client its own way.
        query = parse_qsl(parts.query, keep_blank_values=True)
        mechanisms = [value.lower() for key, value in query if key == "auth_mechanism"]
        rest = [(key, value) for key, value in query if key != "auth_mechanism"]
        url = urlunsplit(parts._replace(query=urlencode(rest))) if mechanisms else url
        host = parts.hostname or "localhost"
        found.append(Node(url, host, port, tls, external=mechanisms == ["external"]))
    return found


def in_turn(settings: Settings) -> list[Node]:
    """The nodes in a fresh random order: the order one connection tries them in."""
    found = nodes(settings)
    random.shuffle(found)
    return found


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of `amqps://` connections: the server's certificate is verified
    against `tls_ca_file` (or the system's CAs) and must name the host connected to."""
    return _context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)


@functools.cache
def _context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    what = "AMQP_LISTENER_TLS_CA_FILE"
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None or key is not None:
            what = "AMQP_LISTENER_TLS_CERT_FILE and AMQP_LISTENER_TLS_KEY_FILE"
            if cert is None:
                raise ValueError("a key without a certificate")
            context.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load {what} ({type(exc).__name__}: {exc}): check that the files exist, "
            "are readable and hold PEM data"
        ) from None
    return context


def check_login(settings: Settings, node: Node) -> None:
    """Raise ConfigurationError when `node`'s login cannot work with these settings: an
    EXTERNAL login needs a client certificate."""
    if node.external and settings.tls_cert_file is None:
        raise ConfigurationError(
            f"{node.redacted} logs in with a client certificate (auth_mechanism=external), "
            "but none is set: set AMQP_LISTENER_TLS_CERT_FILE and AMQP_LISTENER_TLS_KEY_FILE"
        )


def pika_parameters(settings: Settings, node: Node, name: str) -> pika.URLParameters:
    """pika's parameters for one node: timeouts, heartbeat, TLS, the login and the
    connection name."""
    check_login(settings, node)
    parameters = pika.URLParameters(node.url)
    if node.tls:
        parameters.ssl_options = pika.SSLOptions(ssl_context(settings), server_hostname=node.host)
    if node.external:
        parameters.credentials = pika.credentials.ExternalCredentials()
    parameters.heartbeat = settings.heartbeat
    parameters.connection_attempts = 1
    # Opening a connection has its own bound (the handshake takes several round trips):
    # pika's defaults would be 10 s and 15 s.
    parameters.socket_timeout = settings.connect_timeout
    parameters.stack_timeout = settings.connect_timeout
    parameters.client_properties = {"connection_name": name}
    return parameters


def connect(
    settings: Settings, open_one: Callable[[Node], T], *, what: str, publishing: bool = False
) -> T:
    """`open_one(node)` for each node in turn until one works; its result.

    Raises:
        AuthenticationFailed: a node refused the login (at once).
        BrokerUnreachable: no node answered (PublishUnreachable with `publishing`).
    """
    attempts = _Attempts(settings, what, publishing)
    for node in attempts.order:
        try:
            opened = open_one(node)
        except Exception as exc:
            attempts.failed(node, exc)
            continue
        attempts.connected(node)
        return opened
    raise attempts.none_answered()


async def aconnect(
    settings: Settings,
    open_one: Callable[[Node], Awaitable[T]],
    *,
    what: str,
    publishing: bool = False,
) -> T:
    """The asyncio twin of `connect`."""
    attempts = _Attempts(settings, what, publishing)
    for node in attempts.order:
        try:
            opened = await open_one(node)
        except Exception as exc:
            attempts.failed(node, exc)
            continue
        attempts.connected(node)
        return opened
    raise attempts.none_answered()


class _Attempts:
    """One connection's tries: which nodes failed and how, and what is logged."""

    def __init__(self, settings: Settings, what: str, publishing: bool) -> None:
        self.order = in_turn(settings)
        self.what = what
        self.publishing = publishing
        self.errors: list[tuple[BrokerError, BaseException]] = []

    def failed(self, node: Node, exc: Exception) -> None:
        if isinstance(exc, ConfigurationError):  # the TLS files: no node would do better
            raise exc
        error = connect_error(
            exc, node.redacted, publishing=self.publishing, external=node.external
        )
        if isinstance(error, AuthenticationFailed):
            raise error from exc
        self.errors.append((error, exc))
        if len(self.errors) < len(self.order):
            log.warning("%s: %s; trying the next broker node", self.what, error)

    def connected(self, node: Node) -> None:
        # With one node the address says nothing new; with several, it tells which.
        level = logging.INFO if len(self.order) > 1 else logging.DEBUG
        log.log(level, "%s connected to %s", self.what, node.redacted)

    def none_answered(self) -> BrokerError:
        error, cause = self.errors[-1]
        if len(self.errors) == 1:
            error.__cause__ = cause
            return error
        kind = PublishUnreachable if self.publishing else BrokerUnreachable
        combined = kind(
            f"none of the {len(self.errors)} broker nodes answered: "
            + "; ".join(str(failure) for failure, _ in self.errors)
        )
        combined.__cause__ = cause
        return combined
