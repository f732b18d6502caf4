"""Signals for a worker: the first SIGTERM/SIGINT drains, a second one stops at once;
SIGUSR2 pauses consuming, SIGCONT resumes it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["PAUSE", "RESUME", "install"]

_GRACEFUL = (signal.SIGTERM, signal.SIGINT)
#: Pause and resume consuming (Resque's signals). The supervisor passes them on to its workers.
PAUSE = signal.SIGUSR2
RESUME = signal.SIGCONT


def install(
    loop: asyncio.AbstractEventLoop,
    on_first: Callable[[str], None],
    *,
    second_exits: bool = True,
    on_pause: Callable[[str], None] | None = None,
    on_resume: Callable[[str], None] | None = None,
) -> None:
    """Call `on_first(name)` on the first SIGTERM/SIGINT; exit the process on the second.

    The immediate exit skips the drain: the sockets close with the process, and the broker
    puts every unacked message back in its queue, so nothing is lost, only redone.

    With `second_exits=False` (a supervised worker) repeated signals only drain: tools that
    signal every process of a service (systemd's default KillMode, pkill) would otherwise
    reach a worker twice, once directly and once through its supervisor, and skip the drain.
    The supervisor stops a worker at once with SIGKILL, never with a second SIGTERM.

    `on_pause(name)` runs on SIGUSR2 and `on_resume(name)` on SIGCONT, when given. A
    supervised worker starts with both blocked (a SIGUSR2 before its handler exists would
    kill it: that is the signal's default action); they are unblocked here, once handled, so
    one sent during the start-up is taken now rather than lost.
    """
    received: list[int] = []

    def handle(signum: int) -> None:
        name = signal.Signals(signum).name
        if received and not second_exits:
            return
        if received:
            sys.stderr.write(
                f"amqp-listener: second signal ({name}): exiting now; unacked "
                "messages go back to their queues\n"
            )
            sys.stderr.flush()
            os._exit(128 + signum)
        received.append(signum)
        on_first(name)

    for signum in _GRACEFUL:
        loop.add_signal_handler(signum, handle, signum)
    handled: set[signal.Signals] = set()
    for signum, callback in ((PAUSE, on_pause), (RESUME, on_resume)):
        if callback is not None:
            loop.add_signal_handler(signum, callback, signum.name)
            handled.add(signum)
    if handled:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
