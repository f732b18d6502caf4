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
  consumes (and again "not-ready <reason>", "paused" or "ready" whenever that changes: a
  reconnect, a consumer being re-subscribed, a pause), or the start-up error it met. Some
  start-up errors only a worker can meet (the check declares but does not consume, because
  consuming would take messages: a queue held by an exclusive consumer, read permission
  refused). When a *first* worker fails that way, the
  start fails the way a lone worker's would: the others are stopped, and the error is raised
  for the CLI to print as its one line (exit 1). A *replacement* that cannot start is only a
  death (its reason goes into its death line) and is retried with back-off, since the others
  may be serving. For the same reason the supervisor logs a worker as started only once it
  reported ready, and its own summary ("supervisor pid=... running N worker(s) for: ...")
  once all of them have: a failed start prints nothing but its error. A worker started paused
  reports "paused" instead, which counts as started. After a readiness change a worker also
  sends its supervisor a SIGCHLD, whose only effect is to wake it to read the report at once
  (the health endpoint then sees the change within milliseconds, not at the next tick).

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

- **Signals.** The supervisor blocks SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGUSR2 and
  SIGCONT and takes them synchronously (`sigtimedwait`), so no handler ever runs in the
  middle of a fork or a reap.
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

- **Pause and resume** (SIGUSR2, SIGCONT): the supervisor passes the signal to every worker,
  and remembers it, so that a worker started later (a restart, a reload) starts paused too.
  Each worker cancels its consumers and lets the messages in flight finish (see
  `listener.runner.worker`); SIGCONT subscribes them again. The same signals sent to one
  worker pause or resume that worker only. A worker blocks both until its handlers are in
  place, so one sent while it starts is taken late rather than killing it (the default
  action of SIGUSR2). A shell's `fg`/`bg` sends SIGCONT too: it resumes, which is harmless.

- **Reload** (SIGHUP): a rolling restart that loads new code. Workers are forked from the
  supervisor, which imported the application before the first fork, so forking again would
  only copy the old code. Two ways out were weighed:
  * re-importing the application in each worker after the fork: `importlib.reload` reloads
    one module, not the modules it imported, leaves instances and class identities of the
    old code around (`isinstance` checks, registries, pydantic models) and cannot pick up a
    new version of this framework or a new listener class; fragile, and partial in ways
    that show up only in production.
  * **re-executing the supervisor** (`os.execv` of the same interpreter and command line,
    in place: the pid stays, so systemd, Kubernetes and PDEATHSIG see no change). The new
    image imports everything afresh, as a fresh start does. This is the one chosen.
  The old workers are children of that same pid, so they live on through the exec: their
  pids, their status pipes (made inheritable for the exec) and the supervisor's state
  (pause, the signal mask of the workers) are handed to the new image in the environment
  variable `AMQP_LISTENER_SUPERVISOR_HANDOFF`, and they keep consuming while the new image
  imports. The new image then replaces them one at a time: start the new worker of slot 1,
  wait until it reports that it consumes, SIGTERM the old worker of slot 1 (it drains: its
  in-flight messages finish and are acked within the grace period), then slot 2, and so on.
  The queues never have fewer consumers than before the reload. A replacement that cannot
  start is retried with back-off while the old worker it was to replace keeps consuming.
  Before the exec, which cannot be undone, the new code is tried in a fresh interpreter
  (a child process imports each hosted listener's module and constructs the listener): if
  that fails, the reload is refused with one log line and the running workers carry on.
  The start-up broker check is skipped in a reloaded image (the workers declare their
  topology themselves; their errors only delay the roll). A SIGHUP during a reload, or
  before every worker started, is ignored with a log line. The metrics endpoint (when on)
  is stopped for the exec and bound again by the new image: scrapes fail for that moment and
  its counters start again from zero (Prometheus reads that as a counter reset). The health
  endpoint's socket and serving process are handed over and keep answering.

- **Metrics** (`--metrics-port`): the workers count into prometheus_client's multiprocess
  files, and a small serving process, forked and supervised like a worker (restarted with
  back-off if it dies, killed at the end), answers scrapes with the sum of all workers. The
  supervisor itself runs no server thread: see `listener.metrics` for why, and for the
  order in which the pieces are set up.

- **Health** (`--health-port`, `Settings.health_port`): `/livez` and `/readyz`, answered by
  a serving process of the same kind from the state the supervisor writes to it; see
  `listener.runner.health`. A worker is ready while it consumes on every listener; the
  supervisor is ready while each of its N worker places has a ready worker.

`Worker` itself still runs in-process too (tests and embedders use it that way).
The supervisor needs Linux (`fork`, `sigtimedwait`, `prctl`); elsewhere `run` hosts a single
worker in-process, unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from listener import _loop as loop
from listener import errors
from listener.errors import AuthenticationFailed, BrokerError, BrokerUnreachable, ConfigurationError
from listener.middleware import installed_middleware
from listener.runner.amqp_transport import Transport
from listener.runner.health import LIVE_PATH, READY_PATH, HealthEndpoint
from listener.runner.worker import EXIT_RECYCLE, Worker, warn_consumer_timeouts
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.metrics import MultiprocessEndpoint

__all__ = ["HANDOFF_VAR", "Supervisor", "supervise", "supported"]

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
#: Start-up retries: the same ladder a lone worker uses.
_CONNECT_FIRST = 1.0
_CONNECT_CAP = 15.0
#: A status report must fit one atomic pipe write.
_REPORT_MAX = 2048
#: Seconds the new code may take to import in the reload check before the reload is dropped.
_RELOAD_CHECK_TIMEOUT = 120.0

#: The environment variable that carries the running workers through a reload's re-exec.
HANDOFF_VAR = "AMQP_LISTENER_SUPERVISOR_HANDOFF"

_PR_SET_PDEATHSIG = 1
_CONTROL = {signal.SIGHUP, signal.SIGUSR2, signal.SIGCONT}
_WATCHED = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, *_CONTROL}
#: Kept blocked in a new worker until it handles them (their default would kill or be lost).
_PAUSE_SIGNALS = {signal.SIGUSR2, signal.SIGCONT}

#: Run by a fresh interpreter before a reload: does the new code load, are the listeners
#: still there, can they be constructed? One line on stdout when not.
_RELOAD_CHECK = """\
import importlib, json, sys
spec = json.loads(sys.argv[1])
sys.path[:] = spec["path"]
try:
    from listener.listener import Listener
    for module, name in spec["listeners"]:
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
        if not (isinstance(found, type) and issubclass(found, Listener)):
            raise TypeError(f"{module}:{name} is no longer a Listener subclass")
        found()
except BaseException as exc:
    sys.stdout.write(" ".join(f"{type(exc).__name__}: {exc}".split())[:1000])
    sys.stdout.flush()
    raise SystemExit(1)
"""


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


@dataclass
class _Slot:
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
    delay: float = 0.0  # the last restart delay of a crash loop; 0 after a long life
    restart_at: float | None = None


@dataclass
class _Service:
    """A serving process of the supervisor (metrics, health): what it serves, where, and how."""

    name: str
    url: str
    serve: Callable[[], None]
    slot: _Slot = field(default_factory=lambda: _Slot(0))


@dataclass
class _ReloadCheck:
    """The fresh interpreter trying the new code before a reload."""

    pid: int
    output: IO[bytes]
    deadline: float


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
        self.health: HealthEndpoint | None = None
        self.slots = [_Slot(number) for number in range(1, workers + 1)]
        self._pid = os.getpid()
        self._metrics_service: _Service | None = None
        self._health_service: _Service | None = None
        self._mask: set[int | signal.Signals] = set()
        self._up = False  # every slot has had a worker that consumed
        self._stopping = False
        self._quiet_stop = False
        self._deadline = 0.0
        self._failure: BrokerError | None = None  # a first worker could not start
        self._stop_exits: list[tuple[int, int]] = []  # (pid, wait status) of workers stopped
        self._killed: list[int] = []  # pids that had to be SIGKILLed during the stop
        self._paused = False  # SIGUSR2 came, and no SIGCONT since
        self._health_sent = ""
        self._health_at = 0.0
        # Reloads (SIGHUP).
        self._check: _ReloadCheck | None = None
        self._reloads = 0  # re-execs this supervisor went through
        self._old: dict[int, _Slot] = {}  # workers of the old code, by slot, not yet replaced
        self._retiring: list[_Slot] = []  # replaced workers, draining
        self._roll: list[int] = []  # slots whose new worker is yet to start, in order
        self._rolling: _Slot | None = None  # the slot whose new worker is starting
        self._handoff = _take_handoff()
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
            if self.metrics is not None:
                self.metrics.open()  # a port in use fails here, before the broker is touched
                self._metrics_service = _Service(
                    "metrics endpoint", self.metrics.url, self.metrics.serve
                )
            self._open_health()
            if self._handoff is not None:
                self._check_listeners()
            else:
                early = self._check_broker()
                if early is not None:
                    return early
            if self._metrics_service is not None:
                self._spawn_service(self._metrics_service)
            if self._handoff is not None:
                self._begin_roll()
            else:
                for slot in self.slots:
                    self._spawn(slot)
            return self._supervise()
        finally:
            self._kill_all()  # only does something when an exception got here
            self._kill_check()
            for service in self._services():
                self._kill_service(service)
            for slot in self._workers():
                _close(slot.status_fd)
                slot.status_fd = None
            while signal.sigtimedwait(_WATCHED, 0) is not None:
                pass  # a signal left pending must not hit the caller once unblocked
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            if self.metrics is not None:
                self.metrics.close()
            if self.health is not None:
                self.health.close()

    def _open_health(self) -> None:
        """Bind the health port (or take over the one a reload handed down), fork its server."""
        port = self.settings.health_port
        inherited = (self._handoff or {}).get("health")
        if inherited is not None:
            endpoint = HealthEndpoint.adopt(inherited["endpoint"])
            service = _Service("health endpoint", _health_urls(endpoint), endpoint.serve, _Slot(0))
            service.slot.pid = inherited.get("server")
            service.slot.spawns = 1
            service.slot.started_at = time.monotonic()
            if port is not None and port in (0, endpoint.port):
                self.health, self._health_service = endpoint, service
                self._publish_health(force=True)
                return
            self._kill_service(service)  # the new command line has no (or another) port
            endpoint.close()
        if port is None:
            return
        self.health = HealthEndpoint(port)
        self.health.open()  # ConfigurationError: the CLI's one line, exit 2
        self._health_service = _Service(
            "health endpoint", _health_urls(self.health), self.health.serve
        )
        # Before the broker check: /livez answers (and /readyz says no) while it waits.
        self._spawn_service(self._health_service)

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

    async def _declare_all(self) -> None:
        name = f"amqp-listener supervisor pid={self._pid} start-up check"
        transport = await Transport.connect(self.settings, name=name)
        try:
            for cls in self.listeners:
                await transport.declare(cls.topology(self.settings))
        finally:
            await transport.close()

    def _wait_for_stop(self, seconds: float) -> int | None:
        """Sleep up to `seconds`, waking for SIGTERM/SIGINT/SIGQUIT; returns the signal.

        SIGUSR2 and SIGCONT that come meanwhile decide whether the workers start paused.
        """
        deadline = time.monotonic() + seconds
        while True:
            self._publish_health()
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
            self._reap_services()
            self._restart_services()

    def _stopped_before_start(self, signum: int) -> int:
        name = signal.Signals(signum).name
        log.info("received %s before any worker started; exiting", name)
        return 128 + signum if signum == signal.SIGQUIT else 0

    # -- workers --------------------------------------------------------------------------

    def _workers(self) -> list[_Slot]:
        """Every worker place and every worker being replaced."""
        return [*self.slots, *self._old.values(), *self._retiring]

    def _services(self) -> list[_Service]:
        return [s for s in (self._metrics_service, self._health_service) if s is not None]

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
                self._close_in_child()
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
        slot.started = False
        slot.ready = False
        slot.state = "starting"
        slot.boot_error = None
        slot.spawns += 1
        slot.started_at = time.monotonic()
        slot.restart_at = None
        log.debug("worker %d of %d forked: pid=%d", slot.number, len(self.slots), pid)

    def _close_in_child(self, keep: _Service | None = None) -> None:
        """In a forked child: close what belongs to the supervisor and the other children."""
        for other in self._workers():
            _close(other.status_fd)
        if self.metrics is not None and (keep is None or keep is not self._metrics_service):
            self.metrics.release()
        if self.health is not None and (keep is None or keep is not self._health_service):
            self.health.release()
        if self._check is not None:
            with contextlib.suppress(Exception):
                self._check.output.close()

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
            # SIGUSR2/SIGCONT stay blocked until the worker's loop handles them.
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask | _PAUSE_SIGNALS)
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
                paused=self._paused,
                on_state=lambda state: self._tell(status_fd, state),
                warn_timeouts=False,  # the supervisor warned, once
            )
            return loop.run(worker.run(), self.settings)
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

    def _tell(self, status_fd: int, state: str) -> None:
        """In a worker: report a readiness change, and wake the supervisor to read it.

        SIGCHLD is the wake-up call: the supervisor takes it synchronously anyway, reads the
        reports of every worker when it does, and its default action elsewhere is to be
        ignored, so a stray one harms nothing.
        """
        _report(status_fd, state)
        if os.getppid() == self._pid:
            with contextlib.suppress(OSError):
                os.kill(self._pid, signal.SIGCHLD)

    def _supervise(self) -> int:
        while True:
            self._publish_health()
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
            self._advance_roll()
            self._restart_services()

    def _sleep_time(self) -> float:
        now = time.monotonic()
        starting = any(slot.pid is not None and not slot.started for slot in self.slots)
        wake = now + (_TICK_STARTING if starting else _TICK)
        if self._stopping:
            wake = min(wake, self._deadline)
        else:
            for slot in [*self.slots, *(s.slot for s in self._services())]:
                if slot.pid is None and slot.restart_at is not None:
                    wake = min(wake, slot.restart_at)
            if self._check is not None:
                wake = min(wake, self._check.deadline)
        return max(wake - now, 0.0)

    def _live(self) -> list[_Slot]:
        return [slot for slot in self._workers() if slot.pid is not None]

    def _read_reports(self) -> None:
        for slot in self._workers():
            self._read_report(slot)

    def _read_report(self, slot: _Slot) -> None:
        """Take what the worker in `slot` reported: "ready", "paused", "not-ready <why>", or
        "error <Class> <message>"."""
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
                name, _, message = detail.partition(" ")
                slot.boot_error = _broker_error(name, message)

    def _started(self, slot: _Slot) -> None:
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
        self._reap_services()

    def _exited(self, slot: _Slot, status: int) -> None:
        pid = slot.pid
        assert pid is not None
        slot.pid = None
        slot.started = slot.ready = False
        if self.metrics is not None:
            self.metrics.worker_died(pid)
        lived = time.monotonic() - slot.started_at
        how = _describe(status)
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

    def _replaced_exited(self, slot: _Slot, status: int) -> None:
        """A worker of the old code ended: drained after its replacement started, or died."""
        pid = slot.pid
        assert pid is not None
        slot.pid = None
        _close(slot.status_fd)
        slot.status_fd = None
        if self.metrics is not None:
            self.metrics.worker_died(pid)
        how = _describe(status)
        if slot in self._retiring:
            self._retiring.remove(slot)
        if self._stopping:
            self._stop_exits.append((pid, status))
            log.log(self._stop_level, "worker pid=%d stopped: %s", pid, how)
        elif self._old.get(slot.number) is slot:
            # Died before its replacement was ready: start that replacement next.
            del self._old[slot.number]
            if slot.number in self._roll:
                self._roll.remove(slot.number)
                self._roll.insert(0, slot.number)
            log.warning("worker pid=%d (old code) died: %s; its replacement comes next", pid, how)
        else:
            level = logging.INFO if _clean_stop(status) else logging.WARNING
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
        targets = [s for s in [*self.slots, *self._old.values()] if s.pid is not None]
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
        if self._check is not None or self._rolling is not None or self._roll or self._old:
            log.warning("supervisor received SIGHUP during a reload; ignored")
            return
        if not self._up:
            log.warning("supervisor received SIGHUP before every worker started; ignored")
            return
        spec = {
            "path": [path for path in sys.path if isinstance(path, str)],
            "listeners": [[cls.__module__, cls.__qualname__] for cls in self.listeners],
        }
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in (HANDOFF_VAR, "PROMETHEUS_MULTIPROC_DIR")
        }
        output = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the check ends
        try:
            pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-c", _RELOAD_CHECK, json.dumps(spec)],
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, output.fileno(), 1),
                    (os.POSIX_SPAWN_DUP2, output.fileno(), 2),
                ],
                setpgroup=0,
                setsigmask=self._mask,
            )
        except OSError as exc:
            output.close()
            log.error("supervisor received SIGHUP: cannot check the new code (%s); no reload", exc)
            return
        self._check = _ReloadCheck(pid, output, time.monotonic() + _RELOAD_CHECK_TIMEOUT)
        log.info(
            "supervisor received SIGHUP: reloading; checking that the new code loads "
            "(pid=%d) while %d worker(s) carry on",
            pid,
            len(self._live()),
        )

    def _poll_check(self) -> None:
        check = self._check
        if check is None:
            return
        try:
            pid, status = os.waitpid(check.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = check.pid, 1 << 8
        if pid == 0:
            if time.monotonic() >= check.deadline:
                log.error(
                    "reload abandoned: the new code did not load within %gs; the running "
                    "workers carry on",
                    _RELOAD_CHECK_TIMEOUT,
                )
                self._kill_check()
            return
        self._check = None
        said = ""
        with contextlib.suppress(OSError):
            check.output.seek(0)
            said = check.output.read().decode(errors="replace").strip()
        check.output.close()
        if self._stopping:
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            self._reexec()
            return
        last = said.splitlines()[-1] if said else _describe(status)
        log.error(
            "reload refused: the new code does not load (%s); %d worker(s) carry on with "
            "the code they have",
            last,
            len(self._live()),
        )

    def _kill_check(self) -> None:
        check, self._check = self._check, None
        if check is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(check.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(check.pid, 0)
        check.output.close()

    def _reexec(self) -> None:
        """Replace this process's image with a fresh start of the same command line, handing
        it the running workers (see the module docstring)."""
        workers = [s for s in self.slots if s.pid is not None and s.status_fd is not None]
        retiring = [s for s in self._retiring if s.pid is not None and s.status_fd is not None]
        handoff: dict[str, Any] = {
            "pid": self._pid,
            "mask": sorted(int(signum) for signum in self._mask),
            "paused": self._paused,
            "reloads": self._reloads + 1,
            "workers": [[s.number, s.pid, s.status_fd, s.state] for s in workers],
            "retiring": [[s.number, s.pid, s.status_fd, s.state] for s in retiring],
            "health": None,
        }
        argv = [sys.executable, *sys.orig_argv[1:]]
        log.info(
            "supervisor pid=%d reloading: the new code loads; re-executing %s with %d "
            "worker(s) consuming until their replacements are ready",
            self._pid,
            " ".join(argv[1:3]),
            len(workers),
        )
        if self._metrics_service is not None:
            self._kill_service(self._metrics_service)  # the new image binds the port again
        if self.metrics is not None:
            self.metrics.close()
        if self.health is not None and self._health_service is not None:
            handoff["health"] = {
                "endpoint": self.health.handoff(),
                "server": self._health_service.slot.pid,
            }
        fds = [s.status_fd for s in [*workers, *retiring] if s.status_fd is not None]
        for fd in fds:
            os.set_inheritable(fd, True)
        os.environ[HANDOFF_VAR] = json.dumps(handoff)
        _flush()
        try:
            os.execv(sys.executable, argv)
        except OSError as exc:
            del os.environ[HANDOFF_VAR]
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
            log.error("reload failed: cannot re-execute (%s); carrying on with the old code", exc)
            if self.metrics is not None and self._metrics_service is not None:
                with contextlib.suppress(ConfigurationError):
                    self.metrics.open()
                    self._spawn_service(self._metrics_service)

    def _adopt(self, handoff: dict[str, Any]) -> None:
        """In a re-executed image: take over the workers the old image ran."""
        self._reloads = int(handoff.get("reloads", 1))
        self._paused = bool(handoff.get("paused", False))
        self._up = True  # "reloaded" is logged once the roll is done
        for group, target in (("workers", "old"), ("retiring", "retiring")):
            for number, pid, fd, state in handoff.get(group, []):
                slot = _Slot(int(number), pid=int(pid), status_fd=int(fd), state=str(state))
                slot.started = state != "starting"
                slot.ready = state == "ready"
                slot.started_at = time.monotonic()
                with contextlib.suppress(OSError):
                    os.set_inheritable(int(fd), False)
                    os.set_blocking(int(fd), False)
                if target == "old" and slot.number not in self._old:
                    self._old[slot.number] = slot
                else:
                    self._retiring.append(slot)

    def _begin_roll(self) -> None:
        self._roll = [slot.number for slot in self.slots]
        log.info(
            "supervisor pid=%d re-executed: replacing %d worker(s) one at a time; each old "
            "one drains once its replacement consumes",
            self._pid,
            len(self._old),
        )
        self._advance_roll()

    def _advance_roll(self) -> None:
        """Start the next new worker of a reload once the previous one is ready, and retire
        the old worker it replaces."""
        if self._stopping or not (self._roll or self._rolling or self._old):
            return
        rolling = self._rolling
        if rolling is not None:
            if not rolling.started:
                return  # starting (or restarting with back-off): the old one keeps consuming
            self._retire(rolling)
            self._rolling = None
        while self._rolling is None and self._roll:
            slot = self.slots[self._roll.pop(0) - 1]
            if slot.pid is None and slot.restart_at is None:
                self._spawn(slot)
            if slot.started:
                self._retire(slot)
                continue
            self._rolling = slot
        if self._rolling is None and not self._roll:
            for number in sorted(self._old):  # more old workers than places (none usually)
                self._retire(_Slot(number), number=number)
            names = ", ".join(f"{cls.name()} ({cls.queue})" for cls in self.listeners)
            log.info(
                "supervisor pid=%d reloaded: %d worker(s) on the new code for: %s",
                self._pid,
                len(self.slots),
                names,
            )

    def _retire(self, slot: _Slot, *, number: int | None = None) -> None:
        """SIGTERM the old worker of `slot`'s place: its replacement consumes."""
        old = self._old.pop(slot.number if number is None else number, None)
        if old is None or old.pid is None:
            return
        self._retiring.append(old)
        with contextlib.suppress(ProcessLookupError):
            os.kill(old.pid, signal.SIGTERM)
        if number is None:
            log.info(
                "worker pid=%d replaced by pid=%d: draining (in-flight messages get %gs)",
                old.pid,
                slot.pid,
                self.settings.grace_period,
            )
        else:
            log.info("worker pid=%d has no place in the new fleet: draining", old.pid)

    # -- health ---------------------------------------------------------------------------

    def _publish_health(self, *, force: bool = False) -> None:
        """Tell the health endpoint the state: on a change, and at least once per tick."""
        if self.health is None:
            return
        n = len(self.slots)
        serving: list[_Slot] = []
        for slot in self.slots:
            old = self._old.get(slot.number)
            if slot.pid is not None and slot.started:
                serving.append(slot)
            elif old is not None and old.pid is not None:
                serving.append(old)
        ready = sum(1 for slot in serving if slot.ready)
        paused = self._paused or any(slot.state == "paused" for slot in serving)
        reloading = bool(self._check or self._roll or self._rolling or self._old)
        if self._stopping:
            detail = "stopping"
        elif not self._up and not any(slot.pid for slot in self.slots):
            detail = "starting: checking the broker"
        else:
            detail = f"{ready} of {n} worker(s) consuming"
            if paused:
                detail += "; paused"
            if reloading:
                detail += "; reloading"
        state = {
            "live": not self._stopping,
            "ready": not self._stopping and ready == n,
            "workers": n,
            "ready_workers": ready,
            "paused": paused,
            "stopping": self._stopping,
            "reloading": reloading,
            "detail": detail,
        }
        text = json.dumps(state, sort_keys=True)
        now = time.monotonic()
        if force or text != self._health_sent or now - self._health_at >= _TICK:
            self.health.publish(state)
            self._health_sent, self._health_at = text, now

    # -- serving processes: metrics and health --------------------------------------------

    def _spawn_service(self, service: _Service) -> None:
        """Fork the process that serves `service` (see `listener.metrics`)."""
        server = service.slot
        _flush()
        try:
            pid = os.fork()
        except OSError as exc:
            wait = self._back_off(server, lived=0.0)
            log.error("could not start the %s (%s); trying again in %.1fs", service.name, exc, wait)
            return
        if pid == 0:  # the serving process: never returns into the caller's stack
            code = 1
            try:
                self._close_in_child(keep=service)
                code = self._service_main(service)
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
            "%s pid=%d serving %s",
            service.name,
            pid,
            service.url,
        )
        if service is self._health_service:
            self._publish_health(force=True)

    def _service_main(self, service: _Service) -> int:
        try:
            _die_with_parent(self._pid)
            os.setpgid(0, 0)
            _stdin_from_devnull()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            service.serve()
        except BaseException:
            log.exception("%s pid=%d crashed", service.name, os.getpid())
        return 1

    def _restart_services(self) -> None:
        now = time.monotonic()
        for service in self._services():
            server = service.slot
            if server.pid is None and server.restart_at is not None and now >= server.restart_at:
                self._spawn_service(service)

    def _reap_services(self) -> None:
        for service in self._services():
            self._reap_service(service)

    def _reap_service(self, service: _Service) -> None:
        server = service.slot
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
            "%s pid=%d died: %s after %.1fs; restarting in %.1fs",
            service.name,
            pid,
            _describe(status),
            lived,
            wait,
        )

    def _kill_service(self, service: _Service) -> None:
        """SIGKILL a serving process and reap it (bounded); it holds nothing to save."""
        server = service.slot
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
            log.error("%s pid=%d did not die after SIGKILL", service.name, server.pid)

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
        self._roll = []
        self._rolling = None
        self._kill_check()
        self._publish_health(force=True)
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


def _take_handoff() -> dict[str, Any] | None:
    """The state a reload's previous image left in the environment (removed from it)."""
    raw = os.environ.pop(HANDOFF_VAR, None)
    if not raw:
        return None
    try:
        handoff = json.loads(raw)
        if not isinstance(handoff, dict) or handoff.get("pid") != os.getpid():
            raise ValueError("not this process's")
    except ValueError as exc:
        log.warning("ignoring %s (%s)", HANDOFF_VAR, exc)
        return None
    return handoff


def _health_urls(endpoint: HealthEndpoint) -> str:
    return f"{endpoint.url}{LIVE_PATH} and {READY_PATH}"


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
