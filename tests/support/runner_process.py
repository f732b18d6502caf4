"""`amqp-listener run` as a real process in tests: start it, read its log, signal it, end it.

The runner's own tests (tests/test_process.py, tests/test_supervisor.py,
tests/test_signals_health.py) and the fault suite (tests/faults/harness.py) start the console
script as a subprocess against a broker. Its stdout and stderr go to files that are read
afresh on every look, so a test waits for a log line instead of sleeping. Worker pids come
from the supervisor's log, never from the subprocess, which is the supervisor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

from support.waiting import alive, wait_until

REPO = Path(__file__).resolve().parents[2]
EXECUTABLE = os.path.join(os.path.dirname(sys.executable), "amqp-listener")
STARTED = re.compile(r"worker \d+ of \d+ started: pid=(\d+)")
DIED_PID = re.compile(r"worker pid=(\d+) died: ")


def clean_env(pythonpath: Path) -> dict[str, str]:
    """This process's environment for a runner, without the listener's own settings.

    AMQP_URL and AMQP_LISTENER_* of the shell running the tests must not reach the runner:
    each test names its broker and settings itself. Output is unbuffered, so a log line is
    on disk as soon as it is written, and `pythonpath` comes first on the import path.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_LISTENER_", "AMQP_URL"))}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(pythonpath), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    return env


class RunnerProcess:
    """One started `amqp-listener` process (the supervisor); stdout and stderr go to files."""

    #: How failure messages name the process.
    role: ClassVar[str] = "runner"
    #: The log line that reports a worker's pid; its one group is the pid.
    worker_line: ClassVar[re.Pattern[str]] = STARTED
    #: How many characters of stderr (its end) a failure message shows; None: all of it.
    shown: ClassVar[int | None] = None

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        out: Path,
        err: Path,
        *,
        new_session: bool = False,
    ) -> None:
        """Start `argv` in the repository; with `new_session` it leads a process group of its
        own, like a command started from a shell (a terminal's Ctrl-C signals that group)."""
        self._out, self._err = out, err
        with out.open("wb") as out_file, err.open("wb") as err_file:
            self.process = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env=env,
                stdout=out_file,
                stderr=err_file,
                start_new_session=new_session,
            )
        self.pid = self.process.pid

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} pid={self.pid} workers={self.worker_pids()} "
            f"rc={self.process.poll()}>"
        )

    @property
    def stdout(self) -> str:
        return self._out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.read_text(errors="replace")

    @property
    def exited(self) -> bool:
        return self.process.poll() is not None

    def send(self, signum: int) -> None:
        """Send signal `signum` to the supervisor."""
        self.process.send_signal(signum)

    def worker_pids(self) -> list[int]:
        """Every worker pid the log reported (see `worker_line`) so far, in order."""
        return [int(pid) for pid in self.worker_line.findall(self.stderr)]

    def every_worker_pid(self) -> set[int]:
        """Reported workers and those that died, maybe before they could be reported."""
        return set(self.worker_pids()) | {int(pid) for pid in DIED_PID.findall(self.stderr)}

    def wait_log(self, text: str, count: int = 1, timeout: float = 15.0) -> None:
        """Wait until `text` appears `count` times on stderr; fail at once if it exits first."""

        def seen() -> bool:
            if self.stderr.count(text) >= count:
                return True
            # Read again once it has exited: the line may have come just before the end.
            if self.exited and self.stderr.count(text) < count:
                raise AssertionError(
                    f"{self.role} exited ({self.process.returncode}) before logging {text!r} "
                    f"{count} time(s); stderr:\n{self._shown_stderr()}"
                )
            return False

        wait_until(seen, timeout, f"{text!r} x{count} on stderr of pid {self.pid}")

    def wait_started(self, count: int, timeout: float = 15.0) -> list[int]:
        """Wait until `count` workers (in all, replacements included) were reported; their pids.

        Fails at once if the process exits first."""

        def started() -> list[int] | None:
            pids = self.worker_pids()
            if len(pids) >= count:
                return pids
            if self.exited and len(self.worker_pids()) < count:
                raise AssertionError(
                    f"{self.role} exited ({self.process.returncode}) before {count} worker(s) "
                    f"started; stderr:\n{self._shown_stderr()}"
                )
            return None

        return wait_until(started, timeout, f"{count} worker(s) of pid {self.pid} started")

    def wait_exit(self, timeout: float) -> int:
        """Wait for the exit; its code. Fails with stderr if it still runs after `timeout`."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.role} pid={self.pid} still running after {timeout}s; stderr:\n"
                f"{self._shown_stderr()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the supervisor and every worker it ever reported.

        The workers die with the supervisor; killing them too is belt and braces, so no
        process outlives the test and holds its queues."""
        pids = self.every_worker_pid()
        if not self.exited:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _shown_stderr(self) -> str:
        stderr = self.stderr
        return stderr if self.shown is None else stderr[-self.shown :]


P = TypeVar("P", bound=RunnerProcess)


class MarkerApp(Generic[P]):
    """A test's instance of an application under tests/apps that reports through marker files.

    Its exchange is the test's `unique` name and its queue that name plus `queue_suffix`; the
    application reads them, and its marker directory, from APP_* variables. Every process it
    starts is kept, so `kill_all` ends them before the test's queues are deleted.
    """

    #: The application module `amqp-listener run` and `declare` load by default.
    module: ClassVar[str]
    #: Appended to the exchange name to make the queue name.
    queue_suffix: ClassVar[str]
    #: The class of the processes `launch` starts.
    process_class: type[P]
    #: The delay queue of the application's one retry delay (retry_delays = (0.1,)).
    retry_queue_suffix: ClassVar[str] = ".retry.100ms"
    #: How message ids start: `<prefix>-<n>`.
    message_id_prefix: ClassVar[str]
    #: Fields every message carries unless `publish` is given them.
    message_defaults: ClassVar[dict[str, object]] = {}

    def __init__(self, unique: str, amqp_url: str, tmp_path: Path, rabbit: Any) -> None:
        self.exchange = unique
        self.queue = unique + self.queue_suffix
        self.dead = f"{self.queue}.dead"
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        self.logs = tmp_path
        self.amqp_url = amqp_url
        self.rabbit = rabbit
        self.runs: list[P] = []
        rabbit.exchanges.add(self.exchange)
        rabbit.queues.update({self.queue, self.dead, self.queue + self.retry_queue_suffix})
        rabbit.track_delay_entry(self.queue, f"{self.exchange}.work")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill_all()  # before the test's `rabbit` deletes the queues under them

    def env(self, **overrides: str) -> dict[str, str]:
        """The runner's environment: this app's broker, names and markers, then `overrides`."""
        return {
            **clean_env(REPO),
            "AMQP_URL": self.amqp_url,
            "APP_EXCHANGE": self.exchange,
            "APP_QUEUE": self.queue,
            "APP_MARKER_DIR": str(self.markers),
            **overrides,
        }

    def launch(
        self, module: str, args: Sequence[str], env: dict[str, str], *, new_session: bool = False
    ) -> P:
        """Start `amqp-listener run MODULE ARGS` with `env` over `self.env()`; do not wait."""
        index = len(self.runs)
        process = self.process_class(
            [EXECUTABLE, "run", module, *args],
            self.env(**env),
            self.logs / f"run-{index}.out",
            self.logs / f"run-{index}.err",
            new_session=new_session,
        )
        self.runs.append(process)
        return process

    def declare(self, **env: str) -> None:
        """`amqp-listener declare MODULE`: the topology exists before anything runs."""
        subprocess.run(
            [EXECUTABLE, "declare", self.module],
            cwd=REPO,
            env=self.env(**env),
            check=True,
            capture_output=True,
            timeout=20,
        )

    def publish(self, n: int, action: str = "ok", **fields: object) -> None:
        """Publish message `n` (persistent JSON) for the application's `action`."""
        body = {"n": n, "action": action, **self.message_defaults, **fields}
        self.rabbit.publish(
            self.exchange,
            "work",
            json.dumps(body).encode(),
            content_type="application/json",
            delivery_mode=2,
            message_id=f"{self.message_id_prefix}-{n}",
        )

    def marked(self, event: str, n: int) -> list[int]:
        """Pids of the processes that reported `event` for message `n`, once per handling."""
        return sorted(int(p.read_text()) for p in self.markers.glob(f"{event}-{n}-*"))

    def wait_marked(self, event: str, n: int, count: int = 1, timeout: float = 10.0) -> list[int]:
        """Wait until `event` was reported `count` times for message `n`; the pids."""
        return wait_until(
            lambda: (pids := self.marked(event, n)) and len(pids) >= count and pids,
            timeout,
            f"{event} x{count} of message {n}",
        )

    def release(self, n: int) -> None:
        """Let the handler holding message `n` finish."""
        (self.markers / f"release-{n}").write_text("go")

    def kill_all(self) -> None:
        """SIGKILL every process started, and their workers."""
        for process in self.runs:
            process.kill()
