"""What a process the supervisor forked does first, before its real work.

Every process the supervisor forks (a worker, a metrics or health serving process, the
outbox relay) is forked by its `listener.runner.child.ChildProcess` and then sets itself up
the same way before it runs: this module is that child's side (`run_worker`,
`run_service`), kept apart from the supervision loop, which only decides when to fork and
what a death means. Why each step:

- **Children never outlive the supervisor.** Each child asks the kernel for SIGKILL when its
  parent dies (`prctl(PR_SET_PDEATHSIG, SIGKILL)`, right after the fork) and then checks that
  its parent is still the supervisor, which closes the race where the supervisor died before
  the `prctl` took effect. If the supervisor is killed with -9, its workers die with it and
  the broker puts their unacked messages back: nothing lost, only redone.
- **Children live in their own process group.** A Ctrl-C in a terminal sends SIGINT to the
  whole foreground group: a worker would get that SIGINT and then the supervisor's SIGTERM,
  take the second one for a "stop now" and skip its drain. With its own group, only the
  supervisor hears the terminal, and the workers hear only the supervisor. (Under systemd,
  use `KillMode=mixed`, so that SIGTERM goes to the supervisor alone and SIGKILL to everyone
  at the end.) A child's stdin is /dev/null: a background process group must not read the
  terminal.
- **The signal mask.** The supervisor blocks the signals it takes synchronously; a child
  gets back the mask the supervisor started with, except that a worker keeps SIGUSR2 and
  SIGCONT blocked until its loop handles them, so one sent while it starts is taken late
  rather than killing it (the default action of SIGUSR2).
- **A worker reports instead of logging its start-up error** (see
  `listener.runner.status_pipe`): the supervisor either ends the start with it, as one line,
  or puts it in that worker's death line.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from listener import _loop as loop
from listener.errors import BrokerError
from listener.middleware import installed_middleware
from listener.runner import status_pipe
from listener.runner.blame import Isolation
from listener.runner.worker import Worker
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener

__all__ = ["PAUSE_SIGNALS", "die_with_parent", "run_service", "run_worker", "stdin_from_devnull"]

log = logging.getLogger("listener.supervisor")

_PR_SET_PDEATHSIG = 1
#: Kept blocked in a new worker until it handles them (their default would kill or be lost).
PAUSE_SIGNALS = {signal.SIGUSR2, signal.SIGCONT}


def run_worker(
    status_fd: int,
    listeners: Sequence[type[Listener]],
    settings: Settings,
    *,
    supervisor: int,
    mask: set[int | signal.Signals],
    fail_fast: bool,
    metrics: bool,
    paused: bool,
    runtime: Path,
) -> int:
    """The body of a worker process; returns its exit code."""
    try:
        die_with_parent(supervisor)
        os.setpgid(0, 0)
        stdin_from_devnull()
        for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # SIGUSR2/SIGCONT stay blocked until the worker's loop handles them.
        signal.pthread_sigmask(signal.SIG_SETMASK, mask | PAUSE_SIGNALS)
        middleware = None
        if metrics:
            from listener.metrics import Metrics

            middleware = [*installed_middleware(), Metrics()]
        # Room for every delivery a worker may hold, twice over (a consumer being replaced
        # keeps its channel until its handlers return).
        slots = 2 * sum(cls.concurrency for cls in listeners) + 8
        isolation = Isolation(runtime, slots)
        worker = Worker(
            listeners,
            settings,
            fail_fast=fail_fast,
            middleware=middleware,
            # The supervisor never sends a second SIGTERM to mean "now" (it uses
            # SIGKILL), so a repeated SIGTERM, from systemd or pkill, only drains.
            second_signal_exits=False,
            paused=paused,
            on_state=lambda state: status_pipe.tell(status_fd, state, supervisor),
            warn_timeouts=False,  # the supervisor warned, once
            isolation=isolation,
        )
        code = loop.run(worker.run(), settings)
        if code == 0:
            isolation.close()  # a clean stop: nothing ran at a death
        return code
    except BrokerError as exc:
        # Reported, not logged: the supervisor either ends the start with it (one line)
        # or puts it in this worker's death line.
        message = " ".join(str(exc).split())
        status_pipe.report_error(status_fd, type(exc).__name__, message)
        return 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        log.exception("worker pid=%d crashed", os.getpid())
        # Reported too: a first worker that crashes before it is ready ends the start
        # with this line instead of being restarted forever.
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        status_pipe.report_error(
            status_fd, "BrokerError", f"worker crashed while starting: {message}"
        )
        return 1


def run_service(
    name: str, serve: Callable[[], None], *, supervisor: int, mask: set[int | signal.Signals]
) -> int:
    """The body of a serving process (metrics, health): serve until killed."""
    try:
        die_with_parent(supervisor)
        os.setpgid(0, 0)
        stdin_from_devnull()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        serve()
    except BaseException:
        log.exception("%s pid=%d crashed", name, os.getpid())
    return 1


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when the supervisor dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def stdin_from_devnull() -> None:
    """Read nothing from the terminal: a background process group must not."""
    with contextlib.suppress(OSError):
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
