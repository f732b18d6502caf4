"""Worker places, their restart back-off, and how a death is told.

A supervisor keeps N places (`Slot`), each with the process in it now. When that process dies
the place is filled again: at once after a long life, with a growing delay while it keeps
dying young. That policy, and the words a death line uses for a wait status, are kept here,
apart from the supervision loop, because the serving processes (metrics, health) are
restarted by the same rule and because they are what an operator reads in the logs.

- **A worker that keeps dying is restarted with back-off.** One that lived less than
  `SHORT_LIFE` seconds is restarted after a delay that doubles from `BACKOFF_FIRST` up to
  `BACKOFF_CAP` (with jitter, so that N crashing workers do not restart in lock-step); one
  that lived longer restarts at once and resets its delay. A fork that fails (no memory, no
  process slots) is retried the same way. A worker that exits with `EXIT_RECYCLE` asked to be
  replaced (handler threads stuck past their timeout): a planned restart, at once.
- **Each death is one log line** (`restart_after_death`): pid, signal name or exit code
  (`describe`), lifetime, restart delay.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field

from listener.errors import BrokerError
from listener.runner.backoff import Backoff
from listener.runner.worker import EXIT_RECYCLE

__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_FIRST",
    "SHORT_LIFE",
    "Slot",
    "back_off",
    "clean_stop",
    "describe",
    "restart_after_death",
]

log = logging.getLogger("listener.supervisor")

#: A worker that died sooner than this (seconds) after it started counts as crash-looping.
SHORT_LIFE = 10.0
#: Restart delays of a crash-looping worker: doubling from the first up to the cap, jittered.
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 30.0


@dataclass
class Slot:
    """One of the N worker places: the process in it now, and its restart back-off.

    Also used for a worker being replaced by a reload (`old`, `retiring`) and for the
    serving processes (number 0).
    """

    number: int
    pid: int | None = None
    status_fd: int | None = None  # read end of the worker's status pipe
    pending: bytes = b""  # a partial report line
    started: bool = False  # the current worker reported that it consumes (or is paused)
    ready: bool = False  # ... and consumes on every listener right now
    state: str = "starting"  # its last report: starting, ready, paused, not-ready
    boot_error: BrokerError | None = None  # the current worker could not start
    spawns: int = 0
    started_at: float = 0.0
    #: Restart delays of a crash loop; reset after a long life.
    backoff: Backoff = field(default_factory=lambda: Backoff(BACKOFF_FIRST, BACKOFF_CAP))
    restart_at: float | None = None


def back_off(slot: Slot, lived: float) -> float:
    """Schedule the slot's next start; returns the delay (grows while it keeps failing)."""
    if lived < SHORT_LIFE:
        wait = slot.backoff.next()
    else:
        slot.backoff.reset()
        wait = 0.0
    slot.restart_at = time.monotonic() + wait
    return wait


def restart_after_death(slot: Slot, pid: int, status: int, lived: float) -> None:
    """Schedule the next start in `slot`, whose worker `pid` ended with wait `status` after
    `lived` seconds, and log its death line."""
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_RECYCLE:
        # It asked to be replaced (stuck handler threads): a planned restart, no back-off.
        slot.restart_at = time.monotonic()
        log.warning(
            "worker pid=%d recycled after %.1fs (handler threads stuck past their "
            "timeout); starting its replacement",
            pid,
            lived,
        )
        return
    how = describe(status)
    if slot.boot_error is not None:
        how = f"{how} (could not start: {slot.boot_error})"
    wait = back_off(slot, lived)
    log.warning("worker pid=%d died: %s after %.1fs; restarting in %.1fs", pid, how, lived, wait)


def clean_stop(status: int) -> bool:
    """A worker stopped well: exit code 0, or killed by the SIGTERM it was sent."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status) == 0
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def describe(status: int) -> str:
    """A wait status in the words of a death line: "killed by SIGKILL", "exited with code 1"."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"killed by {name}{core}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"
