"""Reload (SIGHUP): try the new code, then re-execute the supervisor in place, handing it the
running workers.

Workers are forked from the supervisor, which imported the application before the first
fork, so forking again would only copy the old code. Two ways out were weighed:

* re-importing the application in each worker after the fork: `importlib.reload` reloads one
  module, not the modules it imported, leaves instances and class identities of the old code
  around (`isinstance` checks, registries, pydantic models) and cannot pick up a new version
  of this framework or a new listener class; fragile, and partial in ways that show up only
  in production.
* **re-executing the supervisor** (`os.execv` of the same interpreter and command line, in
  place: the pid stays, so systemd, Kubernetes and PDEATHSIG see no change). The new image
  imports everything afresh, as a fresh start does. This is the one chosen.

The old workers are children of that same pid, so they live on through the exec: their pids,
their status pipes (made inheritable for the exec) and the supervisor's state (pause, the
signal mask of the workers) are handed to the new image in the environment variable
`AMQP_LISTENER_SUPERVISOR_HANDOFF` (`HANDOFF_VAR`), and they keep consuming while the new
image imports; the new image then replaces them one at a time (`listener.runner.roll`).

Before the exec, which cannot be undone, the new code is tried in a fresh interpreter
(`ReloadCheck`: a child process imports each hosted listener's module and constructs the
listener): if that fails, the reload is refused with one log line and the running workers
carry on. The start-up broker check is skipped in a reloaded image (the workers declare
their topology themselves; their errors only delay the roll). A SIGHUP during a reload, or
before every worker started, is ignored with a log line. The metrics endpoint (when on) is
stopped for the exec and bound again by the new image: scrapes fail for that moment and its
counters start again from zero (Prometheus reads that as a counter reset). The health
endpoint's socket and serving process are handed over and keep answering.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from listener.runner.child import ChildProcess, flush
from listener.runner.restarts import describe

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.runner.endpoints import Endpoints
    from listener.runner.fleet import Fleet

__all__ = [
    "CHECK_TIMEOUT",
    "HANDOFF_VAR",
    "ReloadCheck",
    "Reloads",
    "argv",
    "handed_workers",
    "handoff",
    "reexec",
    "take_handoff",
]

log = logging.getLogger("listener.supervisor")

#: The environment variable that carries the running workers through a reload's re-exec.
HANDOFF_VAR = "AMQP_LISTENER_SUPERVISOR_HANDOFF"
#: Seconds the new code may take to import in the reload check before the reload is dropped.
CHECK_TIMEOUT = 120.0

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


@dataclass
class ReloadCheck:
    """The fresh interpreter trying the new code before a reload."""

    pid: int
    output: IO[bytes]
    deadline: float

    @classmethod
    def start(
        cls, listeners: Sequence[type[Listener]], mask: set[int | signal.Signals]
    ) -> ReloadCheck | None:
        """Start the check in a process group of its own; None (logged) if it cannot start."""
        spec = {
            "path": [path for path in sys.path if isinstance(path, str)],
            "listeners": [[cls.__module__, cls.__qualname__] for cls in listeners],
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
                setsigmask=mask,
            )
        except OSError as exc:
            output.close()
            log.error("supervisor received SIGHUP: cannot check the new code (%s); no reload", exc)
            return None
        return cls(pid, output, time.monotonic() + CHECK_TIMEOUT)

    def poll(self) -> int | None:
        """The check's wait status once it ended (reaped), else None."""
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 1 << 8
        return None if pid == 0 else status

    def verdict(self, status: int) -> str | None:
        """Once it ended with `status`: None when the new code loads, else why it does not.
        Closes the check's output."""
        said = ""
        with contextlib.suppress(OSError):
            self.output.seek(0)
            said = self.output.read().decode(errors="replace").strip()
        self.output.close()
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return None
        return said.splitlines()[-1] if said else describe(status)

    def kill(self) -> None:
        """SIGKILL the check and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.output.close()


def argv() -> list[str]:
    """The command line a reload re-executes: this one, with the same interpreter."""
    return [sys.executable, *sys.orig_argv[1:]]


def handoff(
    *,
    pid: int,
    mask: Iterable[int | signal.Signals],
    paused: bool,
    reloads: int,
    workers: Sequence[ChildProcess],
    retiring: Sequence[ChildProcess],
    health: dict[str, Any] | None,
) -> dict[str, Any]:
    """The state the new image takes over (`health`: see `Endpoints.before_exec`)."""
    return {
        "pid": pid,
        "mask": sorted(int(signum) for signum in mask),
        "paused": paused,
        "reloads": reloads,
        "workers": [[s.number, s.pid, s.status_fd, s.state] for s in workers],
        "retiring": [[s.number, s.pid, s.status_fd, s.state] for s in retiring],
        "health": health,
    }


def reexec(command: list[str], state: dict[str, Any], fds: Sequence[int]) -> OSError:
    """Replace this process's image with `command`, handing it `state` and `fds`.

    Returns only when the exec failed, with the error, after undoing what it prepared.
    """
    for fd in fds:
        os.set_inheritable(fd, True)
    os.environ[HANDOFF_VAR] = json.dumps(state)
    flush()
    try:
        os.execv(sys.executable, command)
    except OSError as exc:
        del os.environ[HANDOFF_VAR]
        for fd in fds:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        return exc


def take_handoff() -> dict[str, Any] | None:
    """The state a reload's previous image left in the environment (removed from it)."""
    raw = os.environ.pop(HANDOFF_VAR, None)
    if not raw:
        return None
    try:
        state = json.loads(raw)
        if not isinstance(state, dict) or state.get("pid") != os.getpid():
            raise ValueError("not this process's")
    except ValueError as exc:
        log.warning("ignoring %s (%s)", HANDOFF_VAR, exc)
        return None
    return state


def handed_workers(state: dict[str, Any], group: str) -> list[ChildProcess]:
    """The workers of `group` ("workers": still in their places, or "retiring": draining)
    a previous image handed down, their status pipes made non-blocking and private again."""
    return [
        ChildProcess.adopt(int(number), int(pid), int(fd), str(reported))
        for number, pid, fd, reported in state.get(group, [])
    ]


class Reloads:
    """The supervisor's side of a reload: the check of the new code under way, then the
    re-exec once it passed."""

    def __init__(self, supervisor: int) -> None:
        self.supervisor = supervisor
        #: The check of the new code, while it runs.
        self.check: ReloadCheck | None = None

    def begin(
        self,
        listeners: Sequence[type[Listener]],
        mask: set[int | signal.Signals],
        fleet: Fleet,
    ) -> None:
        """SIGHUP: start checking the new code, unless a reload is under way or the workers
        have yet to start."""
        if self.check is not None or fleet.roll.active:
            log.warning("supervisor received SIGHUP during a reload; ignored")
            return
        if not fleet.up:
            log.warning("supervisor received SIGHUP before every worker started; ignored")
            return
        check = ReloadCheck.start(listeners, mask)
        if check is None:
            return
        self.check = check
        log.info(
            "supervisor received SIGHUP: reloading; checking that the new code loads "
            "(pid=%d) while %d worker(s) carry on",
            check.pid,
            len(fleet.live()),
        )

    def passed(self, *, stopping: bool, workers: int) -> bool:
        """Whether the check ended and the new code loads (then re-exec, unless stopping).
        A check that failed or took too long is logged, with the `workers` that carry on."""
        check = self.check
        if check is None:
            return False
        status = check.poll()
        if status is None:
            if time.monotonic() >= check.deadline:
                log.error(
                    "reload abandoned: the new code did not load within %gs; the running "
                    "workers carry on",
                    CHECK_TIMEOUT,
                )
                self.kill_check()
            return False
        self.check = None
        refused = check.verdict(status)
        if stopping:
            return False
        if refused is None:
            return True
        log.error(
            "reload refused: the new code does not load (%s); %d worker(s) carry on with "
            "the code they have",
            refused,
            workers,
        )
        return False

    def kill_check(self) -> None:
        """End the check, if one runs."""
        check, self.check = self.check, None
        if check is not None:
            check.kill()

    def reexec(
        self, *, mask: set[int | signal.Signals], paused: bool, fleet: Fleet, endpoints: Endpoints
    ) -> None:
        """Replace this process's image with a fresh start of the same command line, handing
        it the running workers; returns only when the exec failed (logged)."""
        workers = [c for c in fleet.places if c.pid is not None and c.status_fd is not None]
        retiring = [c for c in fleet.roll.retiring if c.pid is not None and c.status_fd is not None]
        command = argv()
        log.info(
            "supervisor pid=%d reloading: the new code loads; re-executing %s with %d "
            "worker(s) consuming until their replacements are ready",
            self.supervisor,
            " ".join(command[1:3]),
            len(workers),
        )
        health = endpoints.before_exec()
        state = handoff(
            pid=self.supervisor,
            mask=mask,
            paused=paused,
            reloads=fleet.reloads + 1,
            workers=workers,
            retiring=retiring,
            health=health,
        )
        fds = [c.status_fd for c in [*workers, *retiring] if c.status_fd is not None]
        exc = reexec(command, state, fds)  # returns only when the exec failed
        log.error("reload failed: cannot re-execute (%s); carrying on with the old code", exc)
        endpoints.after_failed_exec()
