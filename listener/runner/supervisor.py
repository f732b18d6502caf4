"""The supervisor: `amqp-listener run --workers N` keeps N worker processes alive.

One supervisor process forks N workers; each worker runs the in-process
`listener.runner.worker.Worker` (one connection, a consumer per listener, its own graceful
drain). The supervisor holds no broker connection while it runs: it only starts, watches,
restarts and stops workers. This module is its life and its loop; what it drives has a
module of its own:

    child         one forked process: fork, status pipe, reap, kill, restart back-off
    children      what a forked child does first (PDEATHSIG, own group)
    fleet         the N worker places: reports, deaths, the first worker that cannot start
    status_pipe   how a worker reports "ready", "paused", "not-ready" or its start-up error
    restarts      the words of a death line; what counts as a clean stop
    stopping      the drain's deadline, the stop lines, the exit code
    startup       the start-up broker check and the retry ladder it shares with a worker
    endpoints     the metrics and health serving processes
    reload        SIGHUP: trying the new code, re-executing in place, the hand-off
    roll          replacing the old code's workers one place at a time after a reload

Why it is built this way:

- **It always supervises, even with one worker.** A worker can die in ways no code inside it
  can catch (kill -9, a segfault in a C extension, `os._exit`, the OOM killer). Its unacked
  messages go back to their queues by themselves; what is missing is a process to take them,
  so the supervisor starts a new one. A message that keeps killing workers is parked by the
  workers themselves (`worker_lost`) once the quorum queue's delivery count reaches
  `max_attempts`, so a crash loop ends on its own while the supervisor keeps restarting.

- **Imports and one start-up check happen before forking.** The supervisor imports the modules
  and discovers the listeners (the CLI does that), then connects once, with the same retries,
  `--fail-fast` and messages a single worker has always had, declares every listener's
  topology and closes that connection (`listener.runner.startup`). A wrong password, an
  unreachable broker or a `TopologyMismatch` is therefore reported once, as one line with the
  right exit code, instead of once per worker and then again on every restart. The workers
  are forked, not spawned, from a parent that holds no connection, no running event loop and
  no thread, which is what makes forking safe (`listener.runner.children`).

- **A worker counts as started once it reports so** through its status pipe; a *first*
  worker that cannot start ends the start as one line (exit 1), a replacement that cannot
  is retried with back-off (`listener.runner.fleet`). **Nothing a worker does makes the
  supervisor exit** once the workers have started: a worker that dies is restarted, with
  back-off while it keeps dying young, each death one log line (`listener.runner.restarts`).
  Workers never outlive the supervisor, and live in a process group of their own
  (`listener.runner.children`).

- **Signals.** The supervisor blocks SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGUSR2 and
  SIGCONT and takes them synchronously (`sigtimedwait`), so no handler ever runs in the
  middle of a fork or a reap.
  First SIGTERM/SIGINT: stop restarting, forward SIGTERM to every worker, let them drain,
  SIGKILL the stragglers; a second SIGTERM/SIGINT, or SIGQUIT at any time: SIGKILL every
  worker at once and exit 128+signum (`listener.runner.stopping` has the exit codes).

- **Pause and resume** (SIGUSR2, SIGCONT): passed to every worker, and remembered, so that
  a worker started later (a restart, a reload) starts paused too (`listener.runner.fleet`).

- **Reload** (SIGHUP): a rolling restart that loads new code. The supervisor tries the new
  code in a fresh interpreter, then re-executes itself in place (same pid) and hands the
  running workers to the new image, which replaces them one at a time, each old one draining
  once its replacement consumes: see `listener.runner.reload` and `listener.runner.roll`.

- **Metrics** (`--metrics-port`) **and health** (`--health-port`): answered by small
  serving processes, forked and supervised like workers (`listener.runner.endpoints`).

`Worker` itself still runs in-process too (tests and embedders use it that way).
The supervisor needs Linux (`fork`, `sigtimedwait`, `prctl`); elsewhere `run` hosts a single
worker in-process, unsupervised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from listener.errors import ConfigurationError
from listener.runner import children, reload, startup
from listener.runner.blame import Blame
from listener.runner.endpoints import Endpoints, health_state
from listener.runner.fleet import Fleet
from listener.runner.journal import Running
from listener.runner.lost import ledger_recorder
from listener.runner.reload import HANDOFF_VAR, Reloads
from listener.runner.stopping import Stop
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.metrics import MultiprocessEndpoint

__all__ = ["HANDOFF_VAR", "Supervisor", "supervise", "supported"]

log = logging.getLogger("listener.supervisor")

#: Longest sleep of the supervision loop (it reaps and reads reports on every wake-up), and
#: the shorter one while a worker has yet to report that it consumes.
_TICK = 1.0
_TICK_STARTING = 0.05

_CONTROL = {signal.SIGHUP, signal.SIGUSR2, signal.SIGCONT}
_WATCHED = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, *_CONTROL}


def supported() -> bool:
    """Whether this platform can run the supervisor (Linux: fork, sigtimedwait, prctl)."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "fork")
        and hasattr(signal, "sigtimedwait")
        and hasattr(signal, "pthread_sigmask")
    )


def supervise(
    listeners: Sequence[type[Listener]],
    settings: Settings,
    *,
    workers: int = 1,
    fail_fast: bool = False,
    metrics: MultiprocessEndpoint | None = None,
) -> int:
    """Run a supervisor with `workers` worker processes until stopped; returns the exit code.

    Call it from the main thread of a process with no running event loop (the CLI does).
    With `metrics`, the workers count deliveries (`listener.metrics.Metrics`) and a serving
    process answers scrapes on the endpoint's port; the supervisor closes the endpoint at
    the end. With `settings.health_port`, a serving process answers `/livez` and `/readyz`.

    SIGHUP re-executes this process's command line (`sys.orig_argv`) to load new code (see
    the module docstring): a program that embeds the supervisor gets the same, and must call
    `supervise` again, with the same workers, when it starts up again.

    Raises:
        BrokerUnreachable, AuthenticationFailed, TopologyMismatch, BrokerError: at start-up,
            from the broker check or from a first worker that could not start.
        ConfigurationError: `workers` is below 1, the platform cannot supervise processes,
            or the metrics or health port cannot be bound.
    """
    supervisor = Supervisor(
        listeners, settings, workers=workers, fail_fast=fail_fast, metrics=metrics
    )
    return supervisor.run()


class Supervisor:
    """Starts `workers` worker processes, restarts the ones that die, stops them on signals."""

    def __init__(
        self,
        listeners: Sequence[type[Listener]],
        settings: Settings,
        *,
        workers: int = 1,
        fail_fast: bool = False,
        metrics: MultiprocessEndpoint | None = None,
        on_lost: Callable[[int, list[Running]], None] | None = None,
    ) -> None:
        # on_lost: told of the deliveries each worker death interrupted; by default the job
        # ledger records them when a database is configured (`listener.runner.lost`).
        if workers < 1:
            raise ConfigurationError(f"the number of workers must be at least 1, not {workers}")
        if not supported():
            raise ConfigurationError("supervised workers need Linux (fork, sigtimedwait, prctl)")
        self.listeners = list(listeners)
        self.settings = settings
        self.fail_fast = fail_fast
        self.metrics = metrics
        self._pid = os.getpid()
        self._endpoints = Endpoints(
            metrics,
            settings.health_port,
            supervisor=self._pid,
            heartbeat=_TICK,
            state=self._health_state,
            close_in_child=self._close_in_child,
            settings=settings,
        )
        self._mask: set[int | signal.Signals] = set()
        self._stop = Stop(self._pid, settings.grace_period)
        self._paused = False  # SIGUSR2 came, and no SIGCONT since
        self._reloads = Reloads(self._pid)
        self._handoff = reload.take_handoff()
        if on_lost is None:
            on_lost = ledger_recorder(self.listeners, settings)
        self.blame = Blame(self._pid, fresh=self._handoff is None, on_lost=on_lost)
        self._fleet = Fleet(
            workers,
            self._worker,
            supervisor=self._pid,
            listeners=self.listeners,
            settings=settings,
            stop=self._stop,
            blame=self.blame,
            metrics=metrics,
            failed_start=lambda reason: self._begin_stop(reason, quiet=True),
        )
        if self._handoff is not None:
            self._paused = bool(self._handoff.get("paused", False))
            self._fleet.adopt(self._handoff)

    # -- the whole life -------------------------------------------------------------------

    def run(self) -> int:
        """Check the broker, fork the workers, supervise them until stopped; the exit code."""
        if self._handoff is not None:
            self._mask = {signal.Signals(signum) for signum in self._handoff["mask"]}
            signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        else:
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        try:
            self._endpoints.open(self._mask, self._handoff)
            if self._handoff is not None:
                startup.check_listeners(self.listeners, self.settings)
            else:
                early = self._check_broker()
                if early is not None:
                    return early
            self._endpoints.start_metrics()
            if self._handoff is not None:
                self._fleet.roll.begin()
            else:
                for child in self._fleet.places:
                    self._fleet.spawn(child)
            return self._supervise()
        finally:
            self._fleet.kill_all()  # only does something when an exception got here
            self._reloads.kill_check()
            self._endpoints.kill()
            self._fleet.close_pipes()
            while signal.sigtimedwait(_WATCHED, 0) is not None:
                pass  # a signal left pending must not hit the caller once unblocked
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._endpoints.close()
            self.blame.remove()

    def _check_broker(self) -> int | None:
        """Connect once and declare every listener's topology, retrying like a lone worker.

        Returns None when the workers can start, or an exit code when a signal asked to stop
        while the broker was still out of reach.
        """
        startup.check_listeners(self.listeners, self.settings)
        signum = startup.check_broker(
            self.listeners,
            self.settings,
            fail_fast=self.fail_fast,
            name=f"amqp-listener supervisor pid={self._pid} start-up check",
            wait_for_stop=self._wait_for_stop,
        )
        return None if signum is None else self._stop.before_start(signum)

    def _wait_for_stop(self, seconds: float) -> int | None:
        """Sleep up to `seconds`, waking for SIGTERM/SIGINT/SIGQUIT; returns the signal.

        SIGUSR2 and SIGCONT that come meanwhile decide whether the workers start paused.
        """
        deadline = time.monotonic() + seconds
        while True:
            self._endpoints.publish()
            wait = max(deadline - time.monotonic(), 0)
            info = signal.sigtimedwait(_WATCHED, min(wait, _TICK))
            if info is None:
                if wait <= _TICK:
                    return None
                continue
            if info.si_signo in _CONTROL:
                self._control(info.si_signo)
            elif info.si_signo != signal.SIGCHLD:
                return info.si_signo
            self._endpoints.reap(stopping=self._stop.active)
            self._endpoints.restart()

    # -- workers --------------------------------------------------------------------------

    def _worker(self, status_fd: int) -> int:
        """In a forked worker: close what belongs to the others, then be the worker."""
        self._close_in_child()
        self._endpoints.release()
        return children.run_worker(
            status_fd,
            self.listeners,
            self.settings,
            supervisor=self._pid,
            mask=self._mask,
            fail_fast=self.fail_fast,
            metrics=self.metrics is not None,
            paused=self._paused,
            runtime=self.blame.runtime,
        )

    def _close_in_child(self) -> None:
        """In a forked child: close what belongs to the supervisor and its workers (the
        endpoints close theirs)."""
        self._fleet.close_pipes()
        check = self._reloads.check
        if check is not None:
            with contextlib.suppress(Exception):
                check.output.close()

    def _supervise(self) -> int:
        while True:
            self._endpoints.publish()
            info = signal.sigtimedwait(_WATCHED, self._sleep_time())
            if info is not None and info.si_signo in _CONTROL:
                self._control(info.si_signo)
            elif info is not None and info.si_signo != signal.SIGCHLD:
                signum = info.si_signo
                if signum == signal.SIGQUIT or (self._stop.active and not self._stop.quiet):
                    code = self._stop.now(signum)
                    self._fleet.kill_all()
                    return code
                self._begin_stop(f"received {signal.Signals(signum).name}")
            self._fleet.read_reports()
            self._fleet.reap()
            self._endpoints.reap(stopping=self._stop.active)
            live = len(self._fleet.live())
            if self._reloads.passed(stopping=self._stop.active, workers=live):
                # Returns only when the exec failed.
                self._reloads.reexec(
                    mask=self._mask,
                    paused=self._paused,
                    fleet=self._fleet,
                    endpoints=self._endpoints,
                )
            if self._stop.active:
                if not self._fleet.live():
                    return self._stop.finish()
                if time.monotonic() >= self._stop.deadline:
                    self._stop.stragglers([c.pid for c in self._fleet.live() if c.pid is not None])
                    self._fleet.kill_all()
                    return self._stop.finish()
                continue
            self._fleet.restart_due()
            self._fleet.roll.advance()
            self._endpoints.restart()

    def _sleep_time(self) -> float:
        now = time.monotonic()
        wake = now + (_TICK_STARTING if self._fleet.starting else _TICK)
        if self._stop.active:
            wake = min(wake, self._stop.deadline)
        else:
            restarts = [self._fleet.next_restart()]
            restarts += [c.restart_at for c in self._endpoints.processes() if c.pid is None]
            wake = min([wake, *(at for at in restarts if at is not None)])
            if self._reloads.check is not None:
                wake = min(wake, self._reloads.check.deadline)
        return max(wake - now, 0.0)

    # -- control signals: pause, resume, reload -------------------------------------------

    def _control(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop.active:
            log.info("supervisor received %s while stopping; ignored", name)
            return
        if signum == signal.SIGHUP:
            self._reloads.begin(self.listeners, self._mask, self._fleet)
            return
        self._paused = signum == signal.SIGUSR2
        self._fleet.pass_on(signum)

    # -- health --------------------------------------------------------------------------

    def _health_state(self) -> dict[str, Any]:
        return health_state(
            self._fleet.places,
            self._fleet.roll.old,
            paused=self._paused,
            reloading=self._reloads.check is not None or self._fleet.roll.active,
            stopping=self._stop.active,
            up=self._fleet.up,
        )

    # -- stopping -------------------------------------------------------------------------

    def _begin_stop(self, reason: str, *, quiet: bool = False) -> None:
        first = self._stop.begin(quiet=quiet)
        self._fleet.hold()
        self._fleet.roll.halt()
        self._reloads.kill_check()
        self._endpoints.publish(force=True)
        live = self._fleet.live()
        log.log(
            self._stop.level,
            "supervisor %s: stopping %d worker(s); in-flight messages get %gs",
            reason,
            len(live),
            self.settings.grace_period,
        )
        if first:  # else the workers have had their SIGTERM
            self._fleet.signal(signal.SIGTERM, live)
