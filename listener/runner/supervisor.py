"""The supervisor: `amqp-listener run --workers N` keeps N worker processes alive.

One supervisor process forks N workers; each worker runs the in-process
`listener.runner.worker.Worker` (one connection, a consumer per listener, its own graceful
drain). The supervisor holds no broker connection while it runs: it only starts, watches,
restarts and stops workers. Why it is built this way:

- **It always supervises, even with one worker.** A worker can die in ways no code inside it
  can catch (kill -9, a segfault in a C extension, `os._exit`, the OOM killer). Its unacked
  messages go back to their queues by themselves; what is missing is a process to take them,
  so the supervisor starts a new one. A message that keeps killing workers is parked by the
  workers themselves (`worker_lost`) once the quorum queue's delivery count reaches
  `max_attempts`, so a crash loop ends on its own while the supervisor keeps restarting.

- **Imports and one start-up check happen before forking.** The supervisor imports the modules
  and discovers the listeners (the CLI does that), then connects once, with the same retries,
  `--fail-fast` and messages a single worker has always had, declares every listener's
  topology and closes that connection. A wrong password, an unreachable broker or a
  `TopologyMismatch` is therefore reported once, as one line with the right exit code, instead
  of once per worker and then again on every restart. The workers are forked (`os.fork`, not
  spawn: the imported code and the listener classes are inherited, nothing is imported twice)
  from a parent that holds no connection, no running event loop and no thread, which is what
  makes forking safe.

- **Workers report to the supervisor through a pipe.** Each worker writes "ready" once it
  consumes, or the start-up error it met. Some start-up errors only a worker can meet (the
  check declares but does not consume, because consuming would take messages: a queue held by
  an exclusive consumer, read permission refused). When a *first* worker fails that way, the
  start fails the way a lone worker's would: the others are stopped, and the error is raised
  for the CLI to print as its one line (exit 1). A *replacement* that cannot start is only a
  death (its reason goes into its death line) and is retried with back-off, since the others
  may be serving. For the same reason the supervisor logs a worker as started only once it
  reported ready, and its own summary ("supervisor pid=... running N worker(s) for: ...")
  once all of them have: a failed start prints nothing but its error.

- **A worker that keeps dying is restarted with back-off.** A worker that lived less than
  `_SHORT_LIFE` seconds is restarted after a delay that doubles from `_BACKOFF_FIRST` up to
  `_BACKOFF_CAP` (with jitter, so that N crashing workers do not restart in lock-step); one
  that lived longer restarts at once and resets its delay. Each death is one log line on the
  `listener.supervisor` logger: pid, signal name or exit code, lifetime, restart delay. Nothing
  a worker does makes the supervisor exit once the workers have started: a handler calling
  `sys.exit` stops its worker with code 1, and that worker is replaced like any other; a fork
  that fails (no memory, no process slots) is retried the same way.

- **Workers never outlive the supervisor.** Each child asks the kernel for SIGKILL when its
  parent dies (`prctl(PR_SET_PDEATHSIG, SIGKILL)`, right after the fork) and then checks that
  its parent is still the supervisor, which closes the race where the supervisor died before
  the `prctl` took effect. If the supervisor is killed with -9, its workers die with it and
  the broker puts their unacked messages back: nothing lost, only redone.

- **Signals.** The supervisor blocks SIGTERM, SIGINT, SIGQUIT and SIGCHLD and takes them
  synchronously (`sigtimedwait`), so no handler ever runs in the middle of a fork or a reap.
  First SIGTERM/SIGINT: stop restarting, forward SIGTERM to every worker (each drains within
  the grace period, as a lone worker does), wait up to grace + `_STOP_MARGIN` seconds, SIGKILL
  the stragglers; exit 0 when every worker exited 0 or by that SIGTERM, else 1. A second
  SIGTERM/SIGINT, or SIGQUIT at any time: SIGKILL every worker at once and exit 128+signum
  (their unacked messages go back to their queues).

- **Workers live in their own process group.** A Ctrl-C in a terminal sends SIGINT to the whole
  foreground group: a worker would get that SIGINT and then the supervisor's SIGTERM, take the
  second one for a "stop now" and skip its drain. With its own group, only the supervisor hears
  the terminal, and the workers hear only the supervisor. (Under systemd, use
  `KillMode=mixed`, so that SIGTERM goes to the supervisor alone and SIGKILL to everyone at
  the end.) A worker's stdin is /dev/null: a background process group must not read the
  terminal.

- **Metrics** (`--metrics-port`): the workers count into prometheus_client's multiprocess
  files, and a small serving process, forked and supervised like a worker (restarted with
  back-off if it dies, killed at the end), answers scrapes with the sum of all workers. The
  supervisor itself runs no server thread: see `listener.metrics` for why, and for the
  order in which the pieces are set up.

`Worker` itself is unchanged and still runs in-process (tests and embedders use it that way).
The supervisor needs Linux (`fork`, `sigtimedwait`, `prctl`); elsewhere `run` hosts a single
worker in-process, unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from listener import errors
from listener.errors import AuthenticationFailed, BrokerError, BrokerUnreachable, ConfigurationError
from listener.middleware import installed_middleware
from listener.runner.amqp_transport import Transport
from listener.runner.worker import EXIT_RECYCLE, Worker
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.metrics import MultiprocessEndpoint

__all__ = ["Supervisor", "supervise", "supported"]

log = logging.getLogger("listener.supervisor")

#: A worker that died sooner than this (seconds) after it started counts as crash-looping.
_SHORT_LIFE = 10.0
#: Restart delays of a crash-looping worker: doubling from the first up to the cap, jittered.
_BACKOFF_FIRST = 0.5
_BACKOFF_CAP = 30.0
#: Seconds workers get after the grace period to finish their drain before they are killed.
_STOP_MARGIN = 10.0
#: Seconds to wait for SIGKILLed workers to be reaped.
_REAP_WAIT = 5.0
#: Longest sleep of the supervision loop (it reaps and reads reports on every wake-up), and
#: the shorter one while a worker has yet to report that it consumes.
_TICK = 1.0
_TICK_STARTING = 0.05
#: How often a starting worker checks whether it consumes yet, to report it.
_READY_POLL = 0.05
#: Start-up retries: the same ladder a lone worker uses.
_CONNECT_FIRST = 1.0
_CONNECT_CAP = 15.0
#: A status report must fit one atomic pipe write.
_REPORT_MAX = 2048

_PR_SET_PDEATHSIG = 1
_WATCHED = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD}


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
    the end.

    Raises:
        BrokerUnreachable, AuthenticationFailed, TopologyMismatch, BrokerError: at start-up,
            from the broker check or from a first worker that could not start.
        ConfigurationError: `workers` is below 1, the platform cannot supervise processes,
            or the metrics port cannot be bound.
    """
    supervisor = Supervisor(
        listeners, settings, workers=workers, fail_fast=fail_fast, metrics=metrics
    )
    return supervisor.run()


@dataclass
class _Slot:
    """One of the N worker places: the process in it now, and its restart back-off."""

    number: int
    pid: int | None = None
    status_fd: int | None = None  # read end of the worker's status pipe
    pending: bytes = b""  # a partial report line
    ready: bool = False  # the current worker reported that it consumes
    boot_error: BrokerError | None = None  # the current worker could not start
    spawns: int = 0
    started_at: float = 0.0
    delay: float = 0.0  # the last restart delay of a crash loop; 0 after a long life
    restart_at: float | None = None


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
    ) -> None:
        if workers < 1:
            raise ConfigurationError(f"the number of workers must be at least 1, not {workers}")
        if not supported():
            raise ConfigurationError("supervised workers need Linux (fork, sigtimedwait, prctl)")
        self.listeners = list(listeners)
        self.settings = settings
        self.fail_fast = fail_fast
        self.metrics = metrics
        self.slots = [_Slot(number) for number in range(1, workers + 1)]
        #: The process serving the metrics endpoint (number 0: not a worker place).
        self.server = _Slot(0)
        self._pid = os.getpid()
        self._mask: set[int | signal.Signals] = set()
        self._up = False  # every slot has had a worker that consumed
        self._stopping = False
        self._quiet_stop = False
        self._deadline = 0.0
        self._failure: BrokerError | None = None  # a first worker could not start
        self._stop_exits: list[tuple[int, int]] = []  # (pid, wait status) of workers stopped
        self._killed: list[int] = []  # pids that had to be SIGKILLed during the stop

    # -- the whole life -------------------------------------------------------------------

    def run(self) -> int:
        """Check the broker, fork the workers, supervise them until stopped; the exit code."""
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        try:
            if self.metrics is not None:
                self.metrics.open()  # a port in use fails here, before the broker is touched
            early = self._check_broker()
            if early is not None:
                return early
            if self.metrics is not None:
                self._spawn_server()
            for slot in self.slots:
                self._spawn(slot)
            return self._supervise()
        finally:
            self._kill_all()  # only does something when an exception got here
            self._kill_server()
            for slot in self.slots:
                _close(slot.status_fd)
                slot.status_fd = None
            while signal.sigtimedwait(_WATCHED, 0) is not None:
                pass  # a signal left pending must not hit the caller once unblocked
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            if self.metrics is not None:
                self.metrics.close()

    def _check_broker(self) -> int | None:
        """Connect once and declare every listener's topology, retrying like a lone worker.

        Returns None when the workers can start, or an exit code when a signal asked to stop
        while the broker was still out of reach.
        """
        self._check_listeners()
        attempts = 1 if self.fail_fast else self.settings.connect_attempts
        delay = _CONNECT_FIRST
        for attempt in range(1, attempts + 1):
            try:
                asyncio.run(self._declare_all())
                break
            except AuthenticationFailed:
                raise
            except BrokerUnreachable as exc:
                if attempt == attempts:
                    raise BrokerUnreachable(f"{exc} (gave up after {attempts} attempt(s))") from exc
                wait = delay * random.uniform(0.8, 1.2)
                log.warning(
                    "broker not reachable (attempt %d of %d): %s; retrying in %.1fs",
                    attempt,
                    attempts,
                    exc,
                    wait,
                )
                signum = self._wait_for_stop(wait)
                if signum is not None:
                    return self._stopped_before_start(signum)
                delay = min(delay * 2, _CONNECT_CAP)
        signum = self._wait_for_stop(0)  # a signal that came during the last attempt
        return None if signum is None else self._stopped_before_start(signum)

    def _check_listeners(self) -> None:
        """Instantiate each listener once: an `__init__` that raises would otherwise kill
        every worker at start, forever."""
        for cls in self.listeners:
            try:
                cls()
            except Exception as exc:
                raise ConfigurationError(
                    f"{cls.name()}() raised {type(exc).__name__}: {exc}; a listener must be "
                    "constructible without arguments"
                ) from exc

    async def _declare_all(self) -> None:
        name = f"amqp-listener supervisor pid={self._pid} start-up check"
        transport = await Transport.connect(self.settings, name=name)
        try:
            for cls in self.listeners:
                await transport.declare(cls.topology(self.settings))
        finally:
            await transport.close()

    def _wait_for_stop(self, seconds: float) -> int | None:
        """Sleep up to `seconds`, waking for SIGTERM/SIGINT/SIGQUIT; returns the signal."""
        deadline = time.monotonic() + seconds
        while True:
            info = signal.sigtimedwait(_WATCHED, max(deadline - time.monotonic(), 0))
            if info is None:
                return None
            if info.si_signo != signal.SIGCHLD:
                return info.si_signo

    def _stopped_before_start(self, signum: int) -> int:
        name = signal.Signals(signum).name
        log.info("received %s before any worker started; exiting", name)
        return 128 + signum if signum == signal.SIGQUIT else 0

    # -- workers --------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        threads = threading.active_count()
        if threads > 1:
            log.warning(
                "forking a worker while %d threads run in the supervisor; a module that "
                "starts threads at import makes forking unsafe",
                threads,
            )
        _flush()
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:
            self._spawn_failed(slot, exc)
            return
        try:
            pid = os.fork()
        except OSError as exc:  # out of memory or processes: try again later, never exit
            _close(read_fd)
            _close(write_fd)
            self._spawn_failed(slot, exc)
            return
        if pid == 0:  # the worker: never returns into the caller's stack
            code = 1
            try:
                _close(read_fd)
                for other in self.slots:
                    _close(other.status_fd)
                if self.metrics is not None:
                    self.metrics.release()
                code = self._worker_main(write_fd)
            finally:
                _flush()
                os._exit(code)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        _close(slot.status_fd)
        slot.pid = pid
        slot.status_fd = read_fd
        slot.pending = b""
        slot.ready = False
        slot.boot_error = None
        slot.spawns += 1
        slot.started_at = time.monotonic()
        slot.restart_at = None
        log.debug("worker %d of %d forked: pid=%d", slot.number, len(self.slots), pid)

    def _spawn_failed(self, slot: _Slot, exc: OSError) -> None:
        wait = self._back_off(slot, lived=0.0)
        log.error(
            "could not start worker %d of %d (%s); trying again in %.1fs",
            slot.number,
            len(self.slots),
            exc,
            wait,
        )

    def _back_off(self, slot: _Slot, lived: float) -> float:
        """Schedule the slot's next start; returns the delay (grows while it keeps failing)."""
        if lived < _SHORT_LIFE:
            slot.delay = min(slot.delay * 2, _BACKOFF_CAP) if slot.delay else _BACKOFF_FIRST
            wait = min(slot.delay * random.uniform(0.8, 1.2), _BACKOFF_CAP)
        else:
            slot.delay = 0.0
            wait = 0.0
        slot.restart_at = time.monotonic() + wait
        return wait

    def _worker_main(self, status_fd: int) -> int:
        """The body of a worker process; returns its exit code."""
        try:
            _die_with_parent(self._pid)
            os.setpgid(0, 0)
            _stdin_from_devnull()
            for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            middleware = None
            if self.metrics is not None:
                from listener.metrics import Metrics

                middleware = [*installed_middleware(), Metrics()]
            worker = Worker(
                self.listeners,
                self.settings,
                fail_fast=self.fail_fast,
                middleware=middleware,
                # The supervisor never sends a second SIGTERM to mean "now" (it uses
                # SIGKILL), so a repeated SIGTERM, from systemd or pkill, only drains.
                second_signal_exits=False,
            )
            return asyncio.run(_run_reporting(worker, status_fd))
        except BrokerError as exc:
            # Reported, not logged: the supervisor either ends the start with it (one line)
            # or puts it in this worker's death line.
            message = " ".join(str(exc).split())
            _report(status_fd, f"error {type(exc).__name__} {message}")
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
            _report(status_fd, f"error BrokerError worker crashed while starting: {message}")
            return 1

    def _supervise(self) -> int:
        while True:
            info = signal.sigtimedwait(_WATCHED, self._sleep_time())
            if info is not None and info.si_signo != signal.SIGCHLD:
                signum = info.si_signo
                if signum == signal.SIGQUIT or (self._stopping and not self._quiet_stop):
                    return self._stop_now(signum)
                self._begin_stop(f"received {signal.Signals(signum).name}")
            self._read_reports()
            self._reap()
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
            server = self.server
            if server.pid is None and server.restart_at is not None and now >= server.restart_at:
                self._spawn_server()

    def _sleep_time(self) -> float:
        now = time.monotonic()
        starting = any(slot.pid is not None and not slot.ready for slot in self.slots)
        wake = now + (_TICK_STARTING if starting else _TICK)
        if self._stopping:
            wake = min(wake, self._deadline)
        else:
            for slot in [*self.slots, self.server]:
                if slot.pid is None and slot.restart_at is not None:
                    wake = min(wake, slot.restart_at)
        return max(wake - now, 0.0)

    def _live(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.pid is not None]

    def _read_reports(self) -> None:
        for slot in self.slots:
            self._read_report(slot)

    def _read_report(self, slot: _Slot) -> None:
        """Take what the worker in `slot` reported: "ready", or "error <Class> <message>"."""
        if slot.status_fd is None:
            return
        while True:
            try:
                chunk = os.read(slot.status_fd, 4096)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                _close(slot.status_fd)
                slot.status_fd = None
                break
            slot.pending += chunk
        *lines, slot.pending = slot.pending.split(b"\n")
        for line in lines:
            kind, _, detail = line.decode(errors="replace").partition(" ")
            if kind == "ready" and not slot.ready:
                slot.ready = True
                self._started(slot)
            elif kind == "error" and not slot.ready:
                # Only an error before "ready" is a start-up error; a crash later is a death.
                name, _, message = detail.partition(" ")
                slot.boot_error = _broker_error(name, message)

    def _started(self, slot: _Slot) -> None:
        log.info("worker %d of %d started: pid=%d", slot.number, len(self.slots), slot.pid)
        if not self._up and all(s.ready for s in self.slots):
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
                self._exited(slot, status)
        self._reap_server()

    def _exited(self, slot: _Slot, status: int) -> None:
        pid = slot.pid
        assert pid is not None
        slot.pid = None
        if self.metrics is not None:
            self.metrics.worker_died(pid)
        lived = time.monotonic() - slot.started_at
        how = _describe(status)
        if self._stopping:
            self._stop_exits.append((pid, status))
            log.log(self._stop_level, "worker pid=%d stopped: %s", pid, how)
            return
        if slot.boot_error is not None and slot.spawns == 1:
            # A first worker that cannot start (a permission refused, a queue held by an
            # exclusive consumer, ...) is a start-up error: report it once, like a lone worker.
            self._failure = slot.boot_error
            self._begin_stop(f"worker {slot.number} could not start", quiet=True)
            return
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
        if slot.boot_error is not None:
            how = f"{how} (could not start: {slot.boot_error})"
        wait = self._back_off(slot, lived)
        log.warning(
            "worker pid=%d died: %s after %.1fs; restarting in %.1fs", pid, how, lived, wait
        )

    # -- the metrics endpoint -------------------------------------------------------------

    def _spawn_server(self) -> None:
        """Fork the process that serves the metrics endpoint (see `listener.metrics`)."""
        assert self.metrics is not None
        server = self.server
        _flush()
        try:
            pid = os.fork()
        except OSError as exc:
            wait = self._back_off(server, lived=0.0)
            log.error("could not start the metrics endpoint (%s); trying again in %.1fs", exc, wait)
            return
        if pid == 0:  # the serving process: never returns into the caller's stack
            code = 1
            try:
                for slot in self.slots:
                    _close(slot.status_fd)
                code = self._server_main()
            finally:
                _flush()
                os._exit(code)
        first = server.spawns == 0
        server.pid = pid
        server.spawns += 1
        server.started_at = time.monotonic()
        server.restart_at = None
        log.log(
            logging.INFO if first else logging.DEBUG,
            "metrics endpoint pid=%d serving %s",
            pid,
            self.metrics.url,
        )

    def _server_main(self) -> int:
        assert self.metrics is not None
        try:
            _die_with_parent(self._pid)
            os.setpgid(0, 0)
            _stdin_from_devnull()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self.metrics.serve()
        except BaseException:
            log.exception("metrics endpoint pid=%d crashed", os.getpid())
        return 1

    def _reap_server(self) -> None:
        server = self.server
        if server.pid is None:
            return
        try:
            pid, status = os.waitpid(server.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = server.pid, 0
        if pid == 0:
            return
        server.pid = None
        if self._stopping:
            return
        lived = time.monotonic() - server.started_at
        wait = self._back_off(server, lived)
        log.warning(
            "metrics endpoint pid=%d died: %s after %.1fs; restarting in %.1fs",
            pid,
            _describe(status),
            lived,
            wait,
        )

    def _kill_server(self) -> None:
        """SIGKILL the serving process and reap it (bounded); it holds nothing to save."""
        server = self.server
        server.restart_at = None
        if server.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + _REAP_WAIT
        while server.pid is not None and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(server.pid, os.WNOHANG)
            except ChildProcessError:
                pid = server.pid
            if pid != 0:
                server.pid = None
            else:
                signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        if server.pid is not None:
            log.error("metrics endpoint pid=%d did not die after SIGKILL", server.pid)

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
        deadline = time.monotonic() + _REAP_WAIT
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
            f"pid={pid} {_describe(status)}"
            for pid, status in self._stop_exits
            if not _clean_stop(status) and pid not in self._killed
        ]
        unclean += [f"pid={pid} killed after the grace period" for pid in self._killed]
        clean = sum(1 for _pid, status in self._stop_exits if _clean_stop(status))
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


async def _run_reporting(worker: Worker, status_fd: int) -> int:
    """Run `worker`, telling the supervisor "ready" once it consumes."""

    async def announce() -> None:
        # Worker exposes readiness as a flag only; a few polls during start-up are cheap.
        while not worker.ready:  # noqa: ASYNC110
            await asyncio.sleep(_READY_POLL)
        _report(status_fd, "ready")

    announcer = asyncio.ensure_future(announce())
    try:
        return await worker.run()
    finally:
        announcer.cancel()


def _report(fd: int, line: str) -> None:
    data = line.encode(errors="replace")[: _REPORT_MAX - 1] + b"\n"
    with contextlib.suppress(OSError):
        os.write(fd, data)


def _broker_error(name: str, message: str) -> BrokerError:
    """Rebuild a worker's start-up error in the supervisor, keeping its class."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, BrokerError):
        with contextlib.suppress(Exception):
            return cls(message)
    return BrokerError(message)


def _clean_stop(status: int) -> bool:
    """A worker stopped well: exit code 0, or killed by the SIGTERM it was sent."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status) == 0
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def _describe(status: int) -> str:
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


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when the supervisor dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def _stdin_from_devnull() -> None:
    with contextlib.suppress(OSError):
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _flush() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
