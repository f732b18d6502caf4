"""Forking a child of the supervisor, and what the child does before its real work.

Every process the supervisor forks (a worker, a metrics or health serving process) goes
through `fork`, and then sets itself up the same way before it runs. This module is the fork
itself (`fork_worker` also gives a worker its status pipe and its place) and the child's
side of it, kept apart from the supervision loop, which only decides when to fork and what a
death means. Why each step:

- **Forked, not spawned.** The supervisor imported the application and discovered the
  listeners before the first fork; a forked child inherits them, so nothing is imported
  twice. Forking is safe because the parent holds no connection, no running event loop and
  no thread at that moment. Buffered log lines are flushed first, or both processes would
  write them.
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
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from listener import _loop as loop
from listener.errors import BrokerError
from listener.middleware import installed_middleware
from listener.runner import status_pipe
from listener.runner.blame import Isolation
from listener.runner.restarts import Slot, back_off
from listener.runner.worker import Worker
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener

__all__ = [
    "PAUSE_SIGNALS",
    "REAP_WAIT",
    "close",
    "die_with_parent",
    "flush",
    "fork",
    "fork_worker",
    "run_service",
    "run_worker",
    "stdin_from_devnull",
]

log = logging.getLogger("listener.supervisor")

_PR_SET_PDEATHSIG = 1
#: Seconds to wait for SIGKILLed children to be reaped.
REAP_WAIT = 5.0
#: Kept blocked in a new worker until it handles them (their default would kill or be lost).
PAUSE_SIGNALS = {signal.SIGUSR2, signal.SIGCONT}


def fork(child: Callable[[], int]) -> int:
    """Fork; the child runs `child()` and exits with the code it returns (1 if it raises).

    Returns the child's pid, in the parent only. Raises OSError when the fork fails.
    """
    flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's stack
        code = 1
        try:
            code = child()
        finally:
            flush()
            os._exit(code)
    return pid


def fork_worker(slot: Slot, of: int, body: Callable[[int], int]) -> None:
    """Fork a worker into `slot` (one of `of` places), with a status pipe; the child runs
    `body(status_fd)` and exits with the code it returns.

    A pipe or a fork that fails (out of memory or processes) schedules another try with
    back-off: never an exit.
    """
    threads = threading.active_count()
    if threads > 1:
        log.warning(
            "forking a worker while %d threads run in the supervisor; a module that "
            "starts threads at import makes forking unsafe",
            threads,
        )
    try:
        read_fd, write_fd = os.pipe()
    except OSError as exc:
        _fork_failed(slot, of, exc)
        return

    def child() -> int:
        close(read_fd)
        return body(write_fd)

    try:
        pid = fork(child)
    except OSError as exc:  # out of memory or processes: try again later, never exit
        close(read_fd)
        close(write_fd)
        _fork_failed(slot, of, exc)
        return
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    close(slot.status_fd)
    slot.pid = pid
    slot.status_fd = read_fd
    slot.pending = b""
    slot.started = False
    slot.ready = False
    slot.state = "starting"
    slot.boot_error = None
    slot.spawns += 1
    slot.started_at = time.monotonic()
    slot.restart_at = None
    log.debug("worker %d of %d forked: pid=%d", slot.number, of, pid)


def _fork_failed(slot: Slot, of: int, exc: OSError) -> None:
    wait = back_off(slot, lived=0.0)
    log.error(
        "could not start worker %d of %d (%s); trying again in %.1fs",
        slot.number,
        of,
        exc,
        wait,
    )


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


def close(fd: int | None) -> None:
    """Close a file descriptor if there is one, ignoring one already closed."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def flush() -> None:
    """Write out buffered log lines and output: before a fork, an exit or an exec."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
