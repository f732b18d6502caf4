"""The supervisor's stop: the drain's deadline, the stop lines, and the exit code.

First SIGTERM/SIGINT: the supervisor stops restarting, forwards SIGTERM to every worker (each
drains within the grace period, as a lone worker does), waits up to grace + `STOP_MARGIN`
seconds, and SIGKILLs the stragglers; it exits 0 when every worker exited 0 or by that
SIGTERM, else 1 (`Stop.finish`). A second SIGTERM/SIGINT, or SIGQUIT at any time: SIGKILL
every worker at once and exit 128+signum (`Stop.now`; their unacked messages go back to
their queues). A start that fails because a first worker could not start stops the same
way, quietly (its stop lines at DEBUG), and ends by raising that worker's error.

Kept apart from the supervision loop because it is what the exit code is made of: which
workers ended how, and which had to be killed.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

from listener.errors import BrokerError
from listener.runner.restarts import clean_stop, describe

__all__ = ["STOP_MARGIN", "Stop"]

log = logging.getLogger("listener.supervisor")

#: Seconds workers get after the grace period to finish their drain before they are killed.
STOP_MARGIN = 10.0


class Stop:
    """Whether the supervisor stops, until when its workers may drain, and how they ended."""

    def __init__(self, supervisor: int, grace_period: float) -> None:
        self.supervisor = supervisor
        self.grace_period = grace_period
        #: Stopping: no more restarts; the workers have had their SIGTERM.
        self.active = False
        #: A start that failed: the stop lines are logged at DEBUG only.
        self.quiet = False
        #: When the stragglers are killed (`time.monotonic()`).
        self.deadline = 0.0
        #: The start-up error a first worker met: raised at the end instead of an exit code.
        self.failure: BrokerError | None = None
        self._exits: list[tuple[int, int]] = []  # (pid, wait status) of workers stopped
        self._killed: list[int] = []  # pids that had to be SIGKILLed during the stop

    @property
    def level(self) -> int:
        """The level of the stop's log lines."""
        return logging.DEBUG if self.quiet else logging.INFO

    def begin(self, *, quiet: bool = False) -> bool:
        """Stop (again); whether this is the first time (the deadline starts then)."""
        first = not self.active
        self.active = True
        self.quiet = quiet
        if first:
            self.deadline = time.monotonic() + self.grace_period + STOP_MARGIN
        return first

    def ended(self, pid: int, status: int) -> None:
        """Worker `pid` ended with wait `status` during the stop: its stop line."""
        self._exits.append((pid, status))
        log.log(self.level, "worker pid=%d stopped: %s", pid, describe(status))

    def stragglers(self, pids: list[int]) -> None:
        """These workers outlived the deadline and are about to be killed."""
        waited = self.grace_period + STOP_MARGIN
        for pid in pids:
            log.warning("worker pid=%d did not stop within %gs; killing it", pid, waited)
            self._killed.append(pid)

    def before_start(self, signum: int) -> int:
        """A stop asked for while the broker was still out of reach: the exit code."""
        name = signal.Signals(signum).name
        log.info("received %s before any worker started; exiting", name)
        return 128 + signum if signum == signal.SIGQUIT else 0

    def now(self, signum: int) -> int:
        """A second signal, or SIGQUIT: say so on stderr; the exit code (128+signum). The
        caller kills the workers."""
        name = signal.Signals(signum).name
        what = f"second signal ({name})" if signum != signal.SIGQUIT else name
        sys.stderr.write(
            f"amqp-listener: {what}: exiting now; unacked messages go back to their queues\n"
        )
        sys.stderr.flush()
        return 128 + signum

    def finish(self) -> int:
        """The exit code once every worker is gone (or raise the start-up failure)."""
        if self.failure is not None:
            raise self.failure
        unclean = [
            f"pid={pid} {describe(status)}"
            for pid, status in self._exits
            if not clean_stop(status) and pid not in self._killed
        ]
        unclean += [f"pid={pid} killed after the grace period" for pid in self._killed]
        clean = sum(1 for _pid, status in self._exits if clean_stop(status))
        if unclean:
            log.warning(
                "supervisor pid=%d stopped: %d worker(s) stopped cleanly; not cleanly: %s",
                self.supervisor,
                clean,
                "; ".join(unclean),
            )
            return 1
        log.info("supervisor pid=%d stopped: %d worker(s) stopped cleanly", self.supervisor, clean)
        return 0
