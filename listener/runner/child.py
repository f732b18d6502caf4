"""One process the supervisor forks and watches: a worker, or a serving process.

Every process the supervisor keeps alive (each worker, the metrics and health servers, the
outbox relay) is a `ChildProcess`: the place it fills (`number`: 1..N for a worker, 0 for a
serving process) and the process in it now. Its state changes only through its own methods,
one per step of a child's life:

    spawn / spawn_reporting   fork it (the latter with a status pipe, see `status_pipe`)
    read_reports              take what it reported: starting, ready, paused, its start-up error
    reap                      collect it once it ended (`waitpid`, never blocking)
    signal / stop             send it a signal; end it: SIGTERM, a grace, then SIGKILL
    back_off / restart_now    plan its next start after a death

Why these rules:

- **A process that keeps dying is restarted with back-off.** One that lived less than
  `SHORT_LIFE` seconds is started again after a delay that doubles from `BACKOFF_FIRST` up to
  `BACKOFF_CAP` (`listener.runner.backoff`, with jitter, so that N crashing workers do not
  restart in lock-step); one that lived longer restarts at once and resets its delay. A fork
  that fails (no memory, no process slots) is retried the same way: never an exit.
- **Forked, not spawned.** The supervisor imported the application before the first fork; a
  forked child inherits it, so nothing is imported twice. Forking is safe because the
  parent holds no connection, no running event loop and no thread then. Buffered log lines
  are flushed first, or both processes would write them (`flush`). What the child does
  first (PDEATHSIG, its own process group) is `listener.runner.children`.
- **Reaping never blocks** the supervision loop, except in `stop`, which is bounded: a
  process that survives SIGKILL for `REAP_WAIT` seconds is reported, not waited for.

What a death means (a restart, the end of a start, a stop line) is for the caller to decide:
the supervisor's workers (`listener.runner.fleet`) and its serving processes
(`listener.runner.endpoints`) each have their own words for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from listener.errors import BrokerError
from listener.runner import status_pipe
from listener.runner.backoff import Backoff
from listener.runner.status_pipe import StatusReader

__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_FIRST",
    "REAP_WAIT",
    "SHORT_LIFE",
    "ChildProcess",
    "Exit",
    "Report",
    "close",
    "flush",
    "fork",
]

#: A process that died sooner than this (seconds) after it started counts as crash-looping.
SHORT_LIFE = 10.0
#: Restart delays of a crash-looping process: doubling from the first up to the cap, jittered.
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 30.0
#: Seconds to wait for a SIGKILLed process to be reaped.
REAP_WAIT = 5.0


@dataclass(frozen=True)
class Report:
    """One line a worker wrote on its status pipe, as (`kind`, `detail`).

    `first` is true for the report that made it count as started ("ready" or "paused").
    """

    kind: str
    detail: str
    first: bool = False


@dataclass(frozen=True)
class Exit:
    """How a reaped process ended: its pid, wait status, lifetime, and its last reports
    (read before its pid was forgotten)."""

    pid: int
    status: int
    lived: float
    reports: tuple[Report, ...] = ()


class ChildProcess:
    """The process in one of the supervisor's places, and when to start the next one."""

    def __init__(self, number: int) -> None:
        self._number = number
        self._pid: int | None = None
        self._pipe: StatusReader | None = None
        self._started = False
        self._ready = False
        self._state = "starting"
        self._boot_error: BrokerError | None = None
        self._spawns = 0
        self._started_at = 0.0
        self._backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP)
        self._restart_at: float | None = None

    @classmethod
    def adopt(
        cls, number: int, pid: int | None, status_fd: int | None = None, state: str = "starting"
    ) -> ChildProcess:
        """A process started before a reload's re-exec, handed down by the previous image,
        with the last state it reported; its status pipe made non-blocking and private."""
        child = cls(number)
        child._pid = pid
        child._state = state
        child._started = state != "starting"
        child._ready = state == "ready"
        child._spawns = 1
        child._started_at = time.monotonic()
        if status_fd is not None:
            with contextlib.suppress(OSError):
                os.set_inheritable(status_fd, False)
                os.set_blocking(status_fd, False)
            child._pipe = StatusReader(status_fd)
        return child

    def __repr__(self) -> str:
        return (
            f"<ChildProcess {self._number} pid={self._pid} state={self._state} "
            f"spawns={self._spawns}>"
        )

    # -- what it is now (read-only) --------------------------------------------------------

    @property
    def number(self) -> int:
        """Its place: 1..N for a worker, 0 for a serving process."""
        return self._number

    @property
    def pid(self) -> int | None:
        """The process in this place now; None while it waits for a (re)start."""
        return self._pid

    @property
    def status_fd(self) -> int | None:
        """The read end of its status pipe, while open."""
        return None if self._pipe is None else self._pipe.fd

    @property
    def started(self) -> bool:
        """It reported that it consumes (or is paused)."""
        return self._started

    @property
    def ready(self) -> bool:
        """... and consumes on every listener right now."""
        return self._ready

    @property
    def state(self) -> str:
        """Its last report: starting, ready, paused, not-ready."""
        return self._state

    @property
    def boot_error(self) -> BrokerError | None:
        """The error it could not start with, when it reported one before it started."""
        return self._boot_error

    @property
    def spawns(self) -> int:
        """How many processes this place has had."""
        return self._spawns

    @property
    def started_at(self) -> float:
        """When the process in it now was forked (`time.monotonic()`)."""
        return self._started_at

    @property
    def restart_at(self) -> float | None:
        """When its next start is due (`time.monotonic()`); None when none is planned."""
        return self._restart_at

    def due(self, now: float) -> bool:
        """Whether the place is empty and its restart is due at `now`."""
        return self._pid is None and self._restart_at is not None and now >= self._restart_at

    # -- its life --------------------------------------------------------------------------

    def spawn(self, body: Callable[[], int]) -> int:
        """Fork; the child runs `body()` and exits with the code it returns. Returns the pid.

        Raises:
            OSError: the fork failed (out of memory or processes); nothing changed.
        """
        pid = fork(body)
        self._forked(pid, None)
        return pid

    def spawn_reporting(self, body: Callable[[int], int]) -> int:
        """Fork with a status pipe; the child runs `body(write_fd)`. Returns the pid.

        Raises:
            OSError: the pipe or the fork failed; nothing changed.
        """
        read_fd, write_fd = os.pipe()

        def child() -> int:
            close(read_fd)
            return body(write_fd)

        try:
            pid = fork(child)
        except OSError:
            close(read_fd)
            close(write_fd)
            raise
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self._forked(pid, StatusReader(read_fd))
        return pid

    def _forked(self, pid: int, pipe: StatusReader | None) -> None:
        self.close_pipe()
        self._pid = pid
        self._pipe = pipe
        self._started = self._ready = False
        self._state = "starting"
        self._boot_error = None
        self._spawns += 1
        self._started_at = time.monotonic()
        self._restart_at = None

    def read_reports(self) -> list[Report]:
        """Take what it reported since the last read, in order, and keep its state in line.

        Only an error reported before "ready" or "paused" is a start-up error: a crash later
        is a death.
        """
        if self._pipe is None:
            return []
        reports = []
        for kind, detail in self._pipe.read():
            first = False
            if kind in ("ready", "paused", "not-ready"):
                self._state = kind
                self._ready = kind == "ready"
                if kind != "not-ready" and not self._started:
                    self._started = first = True
            elif kind == "error" and not self._started:
                self._boot_error = status_pipe.boot_error(detail)
            reports.append(Report(kind, detail, first))
        if self._pipe.fd is None:  # end of file
            self._pipe = None
        return reports

    def reap(self) -> Exit | None:
        """If its process ended: reap it, read its last reports, close its pipe and forget
        its pid; how it ended. None while it runs (or when there is none)."""
        pid = self._pid
        if pid is None:
            return None
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: count it as gone
            reaped, status = pid, 0
        if reaped == 0:
            return None
        reports = tuple(self.read_reports())  # what it wrote before it exited
        self.close_pipe()
        self._pid = None
        self._started = self._ready = False
        return Exit(pid, status, time.monotonic() - self._started_at, reports)

    def signal(self, signum: int) -> None:
        """Send `signum` to its process, if it has one that is still there."""
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signum)

    def stop(self, grace: float = 0.0) -> bool:
        """End its process and reap it, bounded, with no restart planned: SIGTERM and up to
        `grace` seconds first when `grace` > 0, then SIGKILL. Whether it is gone."""
        self.hold()
        if self._pid is None:
            return True
        if grace > 0:
            self.signal(signal.SIGTERM)
            self._wait_reaped(grace)
            if self._pid is None:
                return True
        self.signal(signal.SIGKILL)
        self._wait_reaped(REAP_WAIT)
        return self._pid is None

    def _wait_reaped(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.reap() is None and self._pid is not None and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, 0.05)

    def close_pipe(self) -> None:
        """Close the read end of its status pipe (at the end, or in another forked child)."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close()

    # -- its next start --------------------------------------------------------------------

    def back_off(self, lived: float) -> float:
        """Plan the next start after a process that lived `lived` seconds; returns the delay
        (it grows while the place keeps failing young, and resets after a long life)."""
        if lived < SHORT_LIFE:
            wait = self._backoff.next()
        else:
            self._backoff.reset()
            wait = 0.0
        self._restart_at = time.monotonic() + wait
        return wait

    def restart_now(self) -> None:
        """Plan the next start at once, with no back-off (a planned replacement)."""
        self._restart_at = time.monotonic()

    def hold(self) -> None:
        """Plan no next start (stopping)."""
        self._restart_at = None


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
