"""How a worker's death is told, and what it leads to.

When a worker dies its place is filled again (`listener.runner.child.ChildProcess`: at once
after a long life, with a growing delay while it keeps dying young). The words of that death
line, and what counts as a clean stop or as a death at all, are kept here, apart from the
supervision loop, because they are what an operator reads in the logs and what the stop's
exit code and the blame of a death are decided by.

- **Nothing a worker does makes the supervisor exit** once the workers have started. A worker
  that dies is restarted, with back-off while it keeps dying young; a handler calling
  `sys.exit` stops its worker with code 1, and that worker is replaced like any other; a fork
  that fails (no memory, no process slots) is retried the same way. A worker that exits with
  `EXIT_RECYCLE` asked to be replaced (handler threads stuck past their timeout): a planned
  restart, at once.
- **Each death is one log line** on the `listener.supervisor` logger (`restart_after_death`):
  pid, signal name or exit code (`describe`), lifetime, restart delay.
"""

from __future__ import annotations

import logging
import os
import signal

from listener.runner.child import ChildProcess, Exit
from listener.runner.worker import EXIT_RECYCLE

__all__ = ["clean_stop", "describe", "died", "restart_after_death"]

log = logging.getLogger("listener.supervisor")


def restart_after_death(child: ChildProcess, ended: Exit) -> None:
    """Plan the next start in `child`'s place, whose worker ended as `ended` says, and log
    its death line."""
    status, pid, lived = ended.status, ended.pid, ended.lived
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_RECYCLE:
        # It asked to be replaced (stuck handler threads): a planned restart, no back-off.
        child.restart_now()
        log.warning(
            "worker pid=%d recycled after %.1fs (handler threads stuck past their "
            "timeout); starting its replacement",
            pid,
            lived,
        )
        return
    how = describe(status)
    if child.boot_error is not None:
        how = f"{how} (could not start: {child.boot_error})"
    wait = child.back_off(lived)
    log.warning("worker pid=%d died: %s after %.1fs; restarting in %.1fs", pid, how, lived, wait)


def clean_stop(status: int) -> bool:
    """A worker stopped well: exit code 0, or killed by the SIGTERM it was sent."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status) == 0
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def died(status: int) -> bool:
    """Whether a worker that ended with wait `status` died of something it ran, rather than
    stopping (exit 0, the supervisor's SIGTERM) or asking to be replaced (`EXIT_RECYCLE`)."""
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_RECYCLE:
        return False
    return not clean_stop(status)


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
