"""The supervisor: `amqp-listener run --workers N` keeps N worker processes alive.

One supervisor process forks N workers; each worker runs the in-process
`listener.runner.worker.Worker` (one connection, a consumer per listener, its own graceful
drain). The supervisor holds no broker connection while it runs: it only starts, watches,
restarts and stops workers. This module is its life and its loop; what it drives has a
module of its own:

    children      forking a child, and what the child does first (PDEATHSIG, own group)
    status_pipe   how a worker reports "ready", "paused", "not-ready" or its start-up error
    restarts      worker places, their restart back-off, the words of a death line
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

- **A worker counts as started once it reports so** through its status pipe
  (`listener.runner.status_pipe`). Some start-up errors only a worker can meet (the check
  declares but does not consume, because consuming would take messages: a queue held by an
  exclusive consumer, read permission refused). When a *first* worker fails that way, the
  start fails the way a lone worker's would: the others are stopped, and the error is raised
  for the CLI to print as its one line (exit 1). A *replacement* that cannot start is only a
  death (its reason goes into its death line) and is retried with back-off, since the others
  may be serving. For the same reason the supervisor logs a worker as started only once it
  reported ready, and its own summary ("supervisor pid=... running N worker(s) for: ...")
  once all of them have: a failed start prints nothing but its error. A worker started paused
  reports "paused" instead, which counts as started.

- **Nothing a worker does makes the supervisor exit** once the workers have started. A worker
  that dies is restarted, with back-off while it keeps dying young, and each death is one log
  line on the `listener.supervisor` logger (`listener.runner.restarts`); a handler calling
  `sys.exit` stops its worker with code 1, and that worker is replaced like any other; a fork
  that fails (no memory, no process slots) is retried the same way. Workers never outlive the
  supervisor, and live in a process group of their own (`listener.runner.children`).

- **Signals.** The supervisor blocks SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGUSR2 and
  SIGCONT and takes them synchronously (`sigtimedwait`), so no handler ever runs in the
  middle of a fork or a reap.
  First SIGTERM/SIGINT: stop restarting, forward SIGTERM to every worker (each drains within
  the grace period, as a lone worker does), wait up to grace + `_STOP_MARGIN` seconds, SIGKILL
  the stragglers; exit 0 when every worker exited 0 or by that SIGTERM, else 1. A second
  SIGTERM/SIGINT, or SIGQUIT at any time: SIGKILL every worker at once and exit 128+signum
  (their unacked messages go back to their queues).

- **Pause and resume** (SIGUSR2, SIGCONT): the supervisor passes the signal to every worker,
  and remembers it, so that a worker started later (a restart, a reload) starts paused too.
  Each worker cancels its consumers and lets the messages in flight finish (see
  `listener.runner.worker`); SIGCONT subscribes them again. The same signals sent to one
  worker pause or resume that worker only. A worker blocks both until its handlers are in
  place, so one sent while it starts is taken late rather than killing it (the default
  action of SIGUSR2). A shell's `fg`/`bg` sends SIGCONT too: it resumes, which is harmless.

- **Reload** (SIGHUP): a rolling restart that loads new code. The supervisor tries the new
  code in a fresh interpreter, then re-executes itself in place (same pid) and hands the
  running workers to the new image, which replaces them one at a time, each old one draining
  once its replacement consumes: see `listener.runner.reload` and `listener.runner.roll`.

- **Metrics** (`--metrics-port`) **and health** (`--health-port`, `Settings.health_port`):
  answered by small serving processes, forked and supervised like workers; the supervisor
  itself runs no server thread. See `listener.runner.endpoints`. A worker is ready while it
  consumes on every listener; the supervisor is ready while each of its N worker places has a
  ready worker.

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

from listener.errors import BrokerError, ConfigurationError
from listener.runner import children, reload, startup, status_pipe
from listener.runner.blame import Blame
from listener.runner.children import close
from listener.runner.endpoints import Endpoints, health_state
from listener.runner.journal import Running
from listener.runner.lost import ledger_recorder
from listener.runner.reload import HANDOFF_VAR, ReloadCheck
from listener.runner.restarts import Slot, clean_stop, describe, restart_after_death
from listener.runner.roll import Roll
from listener.runner.worker import EXIT_RECYCLE, warn_consumer_timeouts
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.metrics import MultiprocessEndpoint

__all__ = ["HANDOFF_VAR", "Supervisor", "supervise", "supported"]

log = logging.getLogger("listener.supervisor")

#: Seconds workers get after the grace period to finish their drain before they are killed.
_STOP_MARGIN = 10.0
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
        self.slots = [Slot(number) for number in range(1, workers + 1)]
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
        self._up = False  # every slot has had a worker that consumed
        self._stopping = False
        self._quiet_stop = False
        self._deadline = 0.0
        self._failure: BrokerError | None = None  # a first worker could not start
        self._stop_exits: list[tuple[int, int]] = []  # (pid, wait status) of workers stopped
        self._killed: list[int] = []  # pids that had to be SIGKILLed during the stop
        self._paused = False  # SIGUSR2 came, and no SIGCONT since
        # Reloads (SIGHUP).
        self._check: ReloadCheck | None = None
        self._reloads = 0  # re-execs this supervisor went through
        self._roll = Roll(
            self.slots,
            self._spawn,
            supervisor=self._pid,
            listeners=self.listeners,
            grace_period=settings.grace_period,
        )
        self._handoff = reload.take_handoff()
        if on_lost is None:
            on_lost = ledger_recorder(self.listeners, settings)
        self.blame = Blame(self._pid, fresh=self._handoff is None, on_lost=on_lost)
        if self._handoff is not None:
            self._adopt(self._handoff)

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
                self._check_listeners()
            else:
                early = self._check_broker()
                if early is not None:
                    return early
            self._endpoints.start_metrics()
            if self._handoff is not None:
                self._roll.begin()
            else:
                for slot in self.slots:
                    self._spawn(slot)
            return self._supervise()
        finally:
            self._kill_all()  # only does something when an exception got here
            self._kill_check()
            self._endpoints.kill()
            for slot in self._workers():
                close(slot.status_fd)
                slot.status_fd = None
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
        self._check_listeners()
        signum = startup.check_broker(
            self.listeners,
            self.settings,
            fail_fast=self.fail_fast,
            name=f"amqp-listener supervisor pid={self._pid} start-up check",
            wait_for_stop=self._wait_for_stop,
        )
        return None if signum is None else self._stopped_before_start(signum)

    def _check_listeners(self) -> None:
        """Instantiate each listener once: an `__init__` that raises would otherwise kill
        every worker at start, forever. Then warn about time-outs the broker cuts short."""
        for cls in self.listeners:
            try:
                cls()
            except Exception as exc:
                raise ConfigurationError(
                    f"{cls.name()}() raised {type(exc).__name__}: {exc}; a listener must be "
                    "constructible without arguments"
                ) from exc
        warn_consumer_timeouts(self.listeners, self.settings)

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
            self._endpoints.reap(stopping=self._stopping)
            self._endpoints.restart()

    def _stopped_before_start(self, signum: int) -> int:
        name = signal.Signals(signum).name
        log.info("received %s before any worker started; exiting", name)
        return 128 + signum if signum == signal.SIGQUIT else 0

    # -- workers --------------------------------------------------------------------------

    def _workers(self) -> list[Slot]:
        """Every worker place and every worker being replaced."""
        return [*self.slots, *self._roll.old.values(), *self._roll.retiring]

    def _spawn(self, slot: Slot) -> None:
        children.fork_worker(slot, len(self.slots), self._worker)

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
        for other in self._workers():
            close(other.status_fd)
        if self._check is not None:
            with contextlib.suppress(Exception):
                self._check.output.close()

    def _supervise(self) -> int:
        while True:
            self._endpoints.publish()
            info = signal.sigtimedwait(_WATCHED, self._sleep_time())
            if info is not None and info.si_signo in _CONTROL:
                self._control(info.si_signo)
            elif info is not None and info.si_signo != signal.SIGCHLD:
                signum = info.si_signo
                if signum == signal.SIGQUIT or (self._stopping and not self._quiet_stop):
                    return self._stop_now(signum)
                self._begin_stop(f"received {signal.Signals(signum).name}")
            self._read_reports()
            self._reap()
            self._poll_check()  # may re-execute this process: a reload
            now = time.monotonic()
            if self._stopping:
                if not self._live():
                    return self._finish()
                if now >= self._deadline:
                    self._kill_stragglers()
                    return self._finish()
                continue
            for slot in self.slots:
                if slot.pid is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._spawn(slot)
            self._roll.advance()
            self._endpoints.restart()

    def _sleep_time(self) -> float:
        now = time.monotonic()
        starting = any(slot.pid is not None and not slot.started for slot in self.slots)
        wake = now + (_TICK_STARTING if starting else _TICK)
        if self._stopping:
            wake = min(wake, self._deadline)
        else:
            for slot in [*self.slots, *(s.slot for s in self._endpoints.services())]:
                if slot.pid is None and slot.restart_at is not None:
                    wake = min(wake, slot.restart_at)
            if self._check is not None:
                wake = min(wake, self._check.deadline)
        return max(wake - now, 0.0)

    def _live(self) -> list[Slot]:
        return [slot for slot in self._workers() if slot.pid is not None]

    def _read_reports(self) -> None:
        for slot in self._workers():
            self._read_report(slot)

    def _read_report(self, slot: Slot) -> None:
        """Take what the worker in `slot` reported (see `listener.runner.status_pipe`)."""
        for kind, detail in status_pipe.read(slot):
            if kind in ("ready", "paused", "not-ready"):
                slot.state = kind
                slot.ready = kind == "ready"
                if kind != "not-ready" and not slot.started:
                    slot.started = True
                    if slot in self.slots:
                        self._started(slot)
                elif kind == "not-ready" and slot in self.slots and not self._stopping:
                    log.debug("worker pid=%s not ready: %s", slot.pid, detail)
            elif kind == "error" and not slot.started:
                # Only an error before "ready" is a start-up error; a crash later is a death.
                slot.boot_error = status_pipe.boot_error(detail)

    def _started(self, slot: Slot) -> None:
        paused = " (paused)" if slot.state == "paused" else ""
        log.info(
            "worker %d of %d started: pid=%d%s", slot.number, len(self.slots), slot.pid, paused
        )
        if not self._up and all(s.started for s in self.slots):
            self._up = True
            names = ", ".join(f"{cls.name()} ({cls.queue})" for cls in self.listeners)
            log.info(
                "supervisor pid=%d running %d worker(s) for: %s on %s",
                self._pid,
                len(self.slots),
                names,
                self.settings.redacted_url,
            )

    def _reap(self) -> None:
        for slot in self._live():
            assert slot.pid is not None
            try:
                pid, status = os.waitpid(slot.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: count it as gone
                pid, status = slot.pid, 0
            if pid != 0:
                self._read_report(slot)  # what it wrote before it exited
                if slot in self.slots:
                    self._exited(slot, status)
                else:
                    self._replaced_exited(slot, status)
        self._endpoints.reap(stopping=self._stopping)

    def _exited(self, slot: Slot, status: int) -> None:
        pid = slot.pid
        assert pid is not None
        slot.pid = None
        slot.started = slot.ready = False
        if self.metrics is not None:
            self.metrics.worker_died(pid)
        lived = time.monotonic() - slot.started_at
        how = describe(status)
        self.blame.worker_ended(pid, died=not self._stopping and _died(status))
        if self._stopping:
            self._stop_exits.append((pid, status))
            log.log(self._stop_level, "worker pid=%d stopped: %s", pid, how)
            return
        if slot.boot_error is not None and slot.spawns == 1 and not self._reloads:
            # A first worker that cannot start (a permission refused, a queue held by an
            # exclusive consumer, ...) is a start-up error: report it once, like a lone worker.
            # Not after a reload: the workers of the old code are still serving then.
            self._failure = slot.boot_error
            self._begin_stop(f"worker {slot.number} could not start", quiet=True)
            return
        restart_after_death(slot, pid, status, lived)

    def _replaced_exited(self, slot: Slot, status: int) -> None:
        """A worker of the old code ended: drained after its replacement started, or died."""
        pid = slot.pid
        assert pid is not None
        slot.pid = None
        close(slot.status_fd)
        slot.status_fd = None
        if self.metrics is not None:
            self.metrics.worker_died(pid)
        how = describe(status)
        self.blame.worker_ended(pid, died=not self._stopping and _died(status))
        if slot in self._roll.retiring:
            self._roll.retiring.remove(slot)
        if self._stopping:
            self._stop_exits.append((pid, status))
            log.log(self._stop_level, "worker pid=%d stopped: %s", pid, how)
        elif self._roll.old_died(slot):
            # Died before its replacement was ready: that replacement comes next.
            log.warning("worker pid=%d (old code) died: %s; its replacement comes next", pid, how)
        else:
            level = logging.INFO if clean_stop(status) else logging.WARNING
            log.log(level, "worker pid=%d (replaced) stopped: %s", pid, how)

    # -- control signals: pause, resume, reload -------------------------------------------

    def _control(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping:
            log.info("supervisor received %s while stopping; ignored", name)
            return
        if signum == signal.SIGHUP:
            self._begin_reload()
            return
        pause = signum == signal.SIGUSR2
        targets = [s for s in [*self.slots, *self._roll.old.values()] if s.pid is not None]
        if pause:
            log.info(
                "supervisor received %s: pausing %d worker(s); in-flight messages finish, "
                "nothing new is taken until SIGCONT",
                name,
                len(targets),
            )
        else:
            log.info("supervisor received %s: %d worker(s) consume again", name, len(targets))
        self._paused = pause
        for slot in targets:
            assert slot.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signum)

    def _begin_reload(self) -> None:
        if self._check is not None or self._roll.active:
            log.warning("supervisor received SIGHUP during a reload; ignored")
            return
        if not self._up:
            log.warning("supervisor received SIGHUP before every worker started; ignored")
            return
        check = ReloadCheck.start(self.listeners, self._mask)
        if check is None:
            return
        self._check = check
        log.info(
            "supervisor received SIGHUP: reloading; checking that the new code loads "
            "(pid=%d) while %d worker(s) carry on",
            check.pid,
            len(self._live()),
        )

    def _poll_check(self) -> None:
        check = self._check
        if check is None:
            return
        status = check.poll()
        if status is None:
            if time.monotonic() >= check.deadline:
                log.error(
                    "reload abandoned: the new code did not load within %gs; the running "
                    "workers carry on",
                    reload.CHECK_TIMEOUT,
                )
                self._kill_check()
            return
        self._check = None
        refused = check.verdict(status)
        if self._stopping:
            return
        if refused is None:
            self._reexec()
            return
        log.error(
            "reload refused: the new code does not load (%s); %d worker(s) carry on with "
            "the code they have",
            refused,
            len(self._live()),
        )

    def _kill_check(self) -> None:
        check, self._check = self._check, None
        if check is not None:
            check.kill()

    def _reexec(self) -> None:
        """Replace this process's image with a fresh start of the same command line, handing
        it the running workers (see `listener.runner.reload`)."""
        workers = [s for s in self.slots if s.pid is not None and s.status_fd is not None]
        retiring = [s for s in self._roll.retiring if s.pid is not None and s.status_fd is not None]
        argv = reload.argv()
        log.info(
            "supervisor pid=%d reloading: the new code loads; re-executing %s with %d "
            "worker(s) consuming until their replacements are ready",
            self._pid,
            " ".join(argv[1:3]),
            len(workers),
        )
        health = self._endpoints.before_exec()
        handoff = reload.handoff(
            pid=self._pid,
            mask=self._mask,
            paused=self._paused,
            reloads=self._reloads + 1,
            workers=workers,
            retiring=retiring,
            health=health,
        )
        fds = [s.status_fd for s in [*workers, *retiring] if s.status_fd is not None]
        exc = reload.reexec(argv, handoff, fds)  # returns only when the exec failed
        log.error("reload failed: cannot re-execute (%s); carrying on with the old code", exc)
        self._endpoints.after_failed_exec()

    def _adopt(self, handoff: dict[str, Any]) -> None:
        """In a re-executed image: take over the workers the old image ran."""
        self._reloads = int(handoff.get("reloads", 1))
        self._paused = bool(handoff.get("paused", False))
        self._up = True  # "reloaded" is logged once the roll is done
        self._roll.adopt(
            reload.handed_workers(handoff, "workers"), reload.handed_workers(handoff, "retiring")
        )

    # -- health --------------------------------------------------------------------------

    def _health_state(self) -> dict[str, Any]:
        return health_state(
            self.slots,
            self._roll.old,
            paused=self._paused,
            reloading=self._check is not None or self._roll.active,
            stopping=self._stopping,
            up=self._up,
        )

    # -- stopping -------------------------------------------------------------------------

    @property
    def _stop_level(self) -> int:
        return logging.DEBUG if self._quiet_stop else logging.INFO

    def _begin_stop(self, reason: str, *, quiet: bool = False) -> None:
        first = not self._stopping
        self._stopping = True
        self._quiet_stop = quiet
        if first:
            self._deadline = time.monotonic() + self.settings.grace_period + _STOP_MARGIN
        for slot in self.slots:
            slot.restart_at = None
        self._roll.halt()
        self._kill_check()
        self._endpoints.publish(force=True)
        live = self._live()
        log.log(
            self._stop_level,
            "supervisor %s: stopping %d worker(s); in-flight messages get %gs",
            reason,
            len(live),
            self.settings.grace_period,
        )
        if not first:
            return  # the workers have had their SIGTERM
        for slot in live:
            assert slot.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGTERM)

    def _kill_stragglers(self) -> None:
        waited = self.settings.grace_period + _STOP_MARGIN
        for slot in self._live():
            log.warning("worker pid=%d did not stop within %gs; killing it", slot.pid, waited)
            assert slot.pid is not None
            self._killed.append(slot.pid)
        self._kill_all()

    def _stop_now(self, signum: int) -> int:
        name = signal.Signals(signum).name
        what = f"second signal ({name})" if signum != signal.SIGQUIT else name
        sys.stderr.write(
            f"amqp-listener: {what}: exiting now; unacked messages go back to their queues\n"
        )
        sys.stderr.flush()
        self._kill_all()
        return 128 + signum

    def _kill_all(self) -> None:
        """SIGKILL every live worker and reap it (bounded)."""
        live = self._live()
        if not live:
            return
        for slot in live:
            assert slot.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGKILL)
        deadline = time.monotonic() + children.REAP_WAIT
        while self._live() and time.monotonic() < deadline:
            self._reap()
            if self._live():
                signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        for slot in self._live():
            log.error("worker pid=%d did not die after SIGKILL", slot.pid)

    def _finish(self) -> int:
        """The exit code once every worker is gone (or raise the start-up failure)."""
        if self._failure is not None:
            raise self._failure
        unclean = [
            f"pid={pid} {describe(status)}"
            for pid, status in self._stop_exits
            if not clean_stop(status) and pid not in self._killed
        ]
        unclean += [f"pid={pid} killed after the grace period" for pid in self._killed]
        clean = sum(1 for _pid, status in self._stop_exits if clean_stop(status))
        if unclean:
            log.warning(
                "supervisor pid=%d stopped: %d worker(s) stopped cleanly; not cleanly: %s",
                self._pid,
                clean,
                "; ".join(unclean),
            )
            return 1
        log.info("supervisor pid=%d stopped: %d worker(s) stopped cleanly", self._pid, clean)
        return 0


def _died(status: int) -> bool:
    """Whether a worker that ended with wait `status` died of something it ran, rather than
    stopping (exit 0, the supervisor's SIGTERM) or asking to be replaced (`EXIT_RECYCLE`)."""
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_RECYCLE:
        return False
    return not clean_stop(status)
