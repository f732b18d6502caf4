"""The supervisor's workers: its N places, the old code's workers a reload replaces, what
they report and how they end.

Each place is a `listener.runner.child.ChildProcess`; so is each worker of the old code that
a reload handed down (`listener.runner.roll`). The fleet forks, reads, reaps and signals
them all; the supervision loop only asks it to, and decides when.

- **A worker counts as started once it reports so** through its status pipe
  (`listener.runner.status_pipe`). Some start-up errors only a worker can meet (the check
  declares but does not consume, because consuming would take messages: a queue held by an
  exclusive consumer, read permission refused). When a *first* worker fails that way, the
  start fails the way a lone worker's would: the others are stopped, and the error is raised
  for the CLI to print as its one line (exit 1). A *replacement* that cannot start is only a
  death (its reason goes into its death line) and is retried with back-off, since the others
  may be serving. For the same reason a worker is logged as started only once it reported
  ready, and the supervisor's summary ("supervisor pid=... running N worker(s) for: ...")
  once all of them have: a failed start prints nothing but its error. A worker started
  paused reports "paused" instead, which counts as started.
- **Pause and resume** (SIGUSR2, SIGCONT): the supervisor passes the signal to every worker
  (`pass_on`), and remembers it, so that a worker started later (a restart, a reload) starts
  paused too. Each worker cancels its consumers and lets the messages in flight finish (see
  `listener.runner.worker`); SIGCONT subscribes them again. The same signals sent to one
  worker pause or resume that worker only. A worker blocks both until its handlers are in
  place, so one sent while it starts is taken late rather than killing it (the default
  action of SIGUSR2). A shell's `fg`/`bg` sends SIGCONT too: it resumes, which is harmless.
- **Each death is told once**: to the blame of deaths (`listener.runner.blame`), to the
  metrics (its multiprocess files), and as one log line (`listener.runner.restarts`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from listener.runner import reload
from listener.runner.child import REAP_WAIT, ChildProcess, Exit, Report
from listener.runner.restarts import clean_stop, describe, died, restart_after_death
from listener.runner.roll import Roll

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.metrics import MultiprocessEndpoint
    from listener.runner.blame import Blame
    from listener.runner.stopping import Stop
    from listener.settings import Settings

__all__ = ["Fleet"]

log = logging.getLogger("listener.supervisor")


class Fleet:
    """The supervisor's worker processes.

    `body(status_fd)` is what a forked worker runs; `stop` is the supervisor's stop, into
    which workers that end while it stops are told; `failed_start(reason)` is called when a
    first worker could not start (its error is then `stop.failure`).
    """

    def __init__(
        self,
        size: int,
        body: Callable[[int], int],
        *,
        supervisor: int,
        listeners: Sequence[type[Listener]],
        settings: Settings,
        stop: Stop,
        blame: Blame,
        metrics: MultiprocessEndpoint | None,
        failed_start: Callable[[str], None],
    ) -> None:
        self.places = [ChildProcess(number) for number in range(1, size + 1)]
        self.supervisor = supervisor
        self.listeners = listeners
        self.settings = settings
        self.roll = Roll(
            self.places,
            self.spawn,
            supervisor=supervisor,
            listeners=listeners,
            grace_period=settings.grace_period,
        )
        #: Every place has had a worker that consumed.
        self.up = False
        #: Re-execs this supervisor went through.
        self.reloads = 0
        self._body = body
        self._stop = stop
        self._blame = blame
        self._metrics = metrics
        self._failed_start = failed_start

    def adopt(self, handoff: dict[str, Any]) -> None:
        """In a re-executed image: take over the workers the old image ran."""
        self.reloads = int(handoff.get("reloads", 1))
        self.up = True  # "reloaded" is logged once the roll is done
        self.roll.adopt(
            reload.handed_workers(handoff, "workers"), reload.handed_workers(handoff, "retiring")
        )

    def all(self) -> list[ChildProcess]:
        """Every worker place and every worker being replaced."""
        return [*self.places, *self.roll.old.values(), *self.roll.retiring]

    def live(self) -> list[ChildProcess]:
        """The workers whose process runs (not reaped yet)."""
        return [child for child in self.all() if child.pid is not None]

    @property
    def starting(self) -> bool:
        """A place has a worker that has yet to report that it consumes."""
        return any(child.pid is not None and not child.started for child in self.places)

    def next_restart(self) -> float | None:
        """When the soonest restart of a place is due, if one is planned."""
        due = [c.restart_at for c in self.places if c.pid is None and c.restart_at is not None]
        return min(due, default=None)

    def restart_due(self) -> None:
        """Start a worker in each place whose restart is due."""
        now = time.monotonic()
        for child in self.places:
            if child.due(now):
                self.spawn(child)

    def spawn(self, child: ChildProcess) -> None:
        """Fork a worker into `child`'s place. A pipe or a fork that fails schedules another
        try with back-off: never an exit."""
        threads = threading.active_count()
        if threads > 1:
            log.warning(
                "forking a worker while %d threads run in the supervisor; a module that "
                "starts threads at import makes forking unsafe",
                threads,
            )
        of = len(self.places)
        try:
            pid = child.spawn_reporting(self._body)
        except OSError as exc:  # out of memory or processes: try again later, never exit
            wait = child.back_off(lived=0.0)
            log.error(
                "could not start worker %d of %d (%s); trying again in %.1fs",
                child.number,
                of,
                exc,
                wait,
            )
            return
        log.debug("worker %d of %d forked: pid=%d", child.number, of, pid)

    def hold(self) -> None:
        """Restart no place any more (stopping)."""
        for child in self.places:
            child.hold()

    def signal(self, signum: int, children: Sequence[ChildProcess]) -> None:
        """Send `signum` to each of `children` that runs."""
        for child in children:
            child.signal(signum)

    def pass_on(self, signum: int) -> None:
        """SIGUSR2 (pause) or SIGCONT (resume): to every worker in a place or still to be
        replaced (a draining one has nothing to pause)."""
        name = signal.Signals(signum).name
        targets = [c for c in [*self.places, *self.roll.old.values()] if c.pid is not None]
        if signum == signal.SIGUSR2:
            log.info(
                "supervisor received %s: pausing %d worker(s); in-flight messages finish, "
                "nothing new is taken until SIGCONT",
                name,
                len(targets),
            )
        else:
            log.info("supervisor received %s: %d worker(s) consume again", name, len(targets))
        self.signal(signum, targets)

    def close_pipes(self) -> None:
        """Close every status pipe's read end (at the end, or in a forked child)."""
        for child in self.all():
            child.close_pipe()

    # -- reports ---------------------------------------------------------------------------

    def read_reports(self) -> None:
        """Take what every worker reported since the last wake-up."""
        for child in self.all():
            self._took(child, child.read_reports(), child.pid)

    def _took(self, child: ChildProcess, reports: Sequence[Report], pid: int | None) -> None:
        for report in reports:
            if report.first and child in self.places:
                self._started(child, pid, paused=report.kind == "paused")
            elif report.kind == "not-ready" and child in self.places and not self._stop.active:
                log.debug("worker pid=%s not ready: %s", pid, report.detail)

    def _started(self, child: ChildProcess, pid: int | None, *, paused: bool) -> None:
        how = " (paused)" if paused else ""
        log.info("worker %d of %d started: pid=%d%s", child.number, len(self.places), pid, how)
        if not self.up and all(c.started for c in self.places):
            self.up = True
            names = ", ".join(f"{cls.name()} ({cls.queue})" for cls in self.listeners)
            log.info(
                "supervisor pid=%d running %d worker(s) for: %s on %s",
                self.supervisor,
                len(self.places),
                names,
                self.settings.redacted_url,
            )

    # -- deaths ----------------------------------------------------------------------------

    def reap(self) -> None:
        """Reap the workers that ended, and tell each end."""
        for child in self.live():
            ended = child.reap()
            if ended is None:
                continue
            self._took(child, ended.reports, ended.pid)
            if child in self.places:
                self._exited(child, ended)
            else:
                self._replaced_exited(child, ended)

    def _ended(self, ended: Exit) -> None:
        if self._metrics is not None:
            self._metrics.worker_died(ended.pid)
        self._blame.worker_ended(ended.pid, died=not self._stop.active and died(ended.status))

    def _exited(self, child: ChildProcess, ended: Exit) -> None:
        self._ended(ended)
        if self._stop.active:
            self._stop.ended(ended.pid, ended.status)
            return
        if child.boot_error is not None and child.spawns == 1 and not self.reloads:
            # A first worker that cannot start (a permission refused, a queue held by an
            # exclusive consumer, ...) is a start-up error: report it once, like a lone worker.
            # Not after a reload: the workers of the old code are still serving then.
            self._stop.failure = child.boot_error
            self._failed_start(f"worker {child.number} could not start")
            return
        restart_after_death(child, ended)

    def _replaced_exited(self, child: ChildProcess, ended: Exit) -> None:
        """A worker of the old code ended: drained after its replacement started, or died."""
        self._ended(ended)
        self.roll.retired(child)
        pid, how = ended.pid, describe(ended.status)
        if self._stop.active:
            self._stop.ended(pid, ended.status)
        elif self.roll.old_died(child):
            # Died before its replacement was ready: that replacement comes next.
            log.warning("worker pid=%d (old code) died: %s; its replacement comes next", pid, how)
        else:
            level = logging.INFO if clean_stop(ended.status) else logging.WARNING
            log.log(level, "worker pid=%d (replaced) stopped: %s", pid, how)

    def kill_all(self) -> None:
        """SIGKILL every live worker and reap it (bounded)."""
        live = self.live()
        if not live:
            return
        self.signal(signal.SIGKILL, live)
        deadline = time.monotonic() + REAP_WAIT
        while self.live() and time.monotonic() < deadline:
            self.reap()
            if self.live():
                signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        for child in self.live():
            log.error("worker pid=%d did not die after SIGKILL", child.pid)
