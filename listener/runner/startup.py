"""Starting while the broker may be out of reach: the retry ladder, and the supervisor's check.

A lone worker connecting at start-up and a supervisor checking the broker before it forks
meet the same situation (a broker still starting, a network not up yet) and must answer it
the same way: the same number of attempts (`Settings.connect_attempts`, one with
`--fail-fast`), the same back-off, the same warning line per failed attempt and the same
error once they give up. `StartRetries` is that decision, in one place; each caller keeps
its own way of waiting (a worker awaits its stop event, the supervisor takes signals
synchronously), which is why the loop itself is not shared.

The supervisor's check (`check_broker`) connects once and declares every listener's
topology before any worker is forked, so that a wrong password, an unreachable broker or a
`TopologyMismatch` is reported once, as one line with the right exit code, instead of once
per worker and then again on every restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from listener.errors import AuthenticationFailed, BrokerUnreachable, ConfigurationError
from listener.runner.amqp_transport import Transport
from listener.runner.backoff import Backoff
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener

__all__ = [
    "DELAY_CAP",
    "FIRST_DELAY",
    "StartRetries",
    "check_broker",
    "check_listeners",
    "warn_consumer_timeouts",
]

log = logging.getLogger("listener.supervisor")
#: The consumer time-out warning is a worker's (a lone worker gives it too).
_worker_log = logging.getLogger("listener.worker")

#: Seconds before the second attempt; doubled after each failure up to the cap, jittered.
FIRST_DELAY = 1.0
DELAY_CAP = 15.0


class StartRetries:
    """The start-up retry ladder: how many attempts, and how long to wait after each failure.

    Call `failed()` with each `BrokerUnreachable`: it logs one warning on `log` and returns
    the seconds to wait before the next attempt, or raises once the attempts are used up.
    An `AuthenticationFailed` is never retried: a wrong password does not heal with time.
    """

    def __init__(self, settings: Settings, *, fail_fast: bool, log: logging.Logger) -> None:
        self.attempts = 1 if fail_fast else settings.connect_attempts
        self.attempt = 0
        self._backoff = Backoff(FIRST_DELAY, DELAY_CAP)
        self._log = log

    def failed(self, exc: BrokerUnreachable) -> float:
        """Count a failed attempt; the seconds to wait before the next one.

        Raises:
            BrokerUnreachable: that was the last attempt (the message says how many).
        """
        self.attempt += 1
        if self.attempt >= self.attempts:
            raise BrokerUnreachable(f"{exc} (gave up after {self.attempts} attempt(s))") from exc
        wait = self._backoff.next()
        self._log.warning(
            "broker not reachable (attempt %d of %d): %s; retrying in %.1fs",
            self.attempt,
            self.attempts,
            exc,
            wait,
        )
        return wait


def check_broker(
    listeners: Sequence[type[Listener]],
    settings: Settings,
    *,
    fail_fast: bool,
    name: str,
    wait_for_stop: Callable[[float], int | None],
) -> int | None:
    """Connect once as `name` and declare every listener's topology, retrying like a lone
    worker; `wait_for_stop(seconds)` waits between attempts.

    Returns None when the workers can start, or the signal that asked to stop meanwhile.

    Raises:
        BrokerUnreachable, AuthenticationFailed, TopologyMismatch, BrokerError: as a lone
            worker would at start-up.
    """
    retries = StartRetries(settings, fail_fast=fail_fast, log=log)
    while True:
        try:
            asyncio.run(_declare_all(listeners, settings, name))
            break
        except AuthenticationFailed:
            raise
        except BrokerUnreachable as exc:
            signum = wait_for_stop(retries.failed(exc))
            if signum is not None:
                return signum
    return wait_for_stop(0)  # a signal that came during the last attempt


async def _declare_all(listeners: Sequence[type[Listener]], settings: Settings, name: str) -> None:
    transport = await Transport.connect(settings, name=name)
    try:
        for cls in listeners:
            await transport.declare(cls.topology(settings))
    finally:
        await transport.close()


def check_listeners(listeners: Sequence[type[Listener]], settings: Settings) -> None:
    """Instantiate each listener once: an `__init__` that raises would otherwise kill every
    worker at start, forever. Then warn about time-outs the broker cuts short.

    Raises:
        ConfigurationError: a listener cannot be constructed without arguments.
    """
    for cls in listeners:
        try:
            cls()
        except Exception as exc:
            raise ConfigurationError(
                f"{cls.name()}() raised {type(exc).__name__}: {exc}; a listener must be "
                "constructible without arguments"
            ) from exc
    warn_consumer_timeouts(listeners, settings)


def warn_consumer_timeouts(listeners: Sequence[type[Listener]], settings: Settings) -> int:
    """Warn about each listener whose `timeout` is not below the broker's consumer timeout.

    RabbitMQ closes the channel of a consumer that holds a delivery unacked longer than its
    `consumer_timeout` (30 minutes by default since 3.8.15), and the broker does not tell a
    client its value, hence the `consumer_timeout` setting. A handler allowed to run that
    long would lose its channel, and with it the acks of every message on it, before its own
    timeout fired. Returns the number of warnings.
    """
    limit = settings.consumer_timeout
    if not limit:
        return 0
    warned = 0
    for cls in listeners:
        if cls.timeout >= limit:
            warned += 1
            _worker_log.warning(
                "%s: timeout %gs is not below the broker's consumer timeout (%gs): a message "
                "handled that long has its channel closed by the broker and is delivered "
                "again; lower the listener's timeout, or raise the broker's consumer_timeout "
                "and AMQP_LISTENER_CONSUMER_TIMEOUT with it",
                cls.name(),
                cls.timeout,
                limit,
            )
    return warned
