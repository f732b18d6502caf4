"""Starting the measured processes, waiting on their results, stopping them.

Each process starts in a session of its own: a Ctrl-C at the terminal reaches only the
bench, which then kills what it started (the whole group, workers included) and deletes its
queues, instead of leaving a half-stopped consumer behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bench.recorder import read_stats

__all__ = ["ROOT", "Child", "ChildFailed", "cli", "peak_rss_kib", "running", "wait_count"]

#: The checkout: subprocesses run here so that `bench` and `bench.apps` import.
ROOT = Path(__file__).resolve().parent.parent
_STOP_WAIT = 20.0


class ChildFailed(Exception):
    """A measured process exited before it was done; the message ends with its output."""


class Child:
    """One measured process (and, for `amqp-listener run`, its workers)."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self, lines: int = 12) -> str:
        """The last `lines` the process wrote, indented under the message they explain."""
        tail = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        return "\n    ".join(tail) or "(no output)"

    def failed(self, what: str) -> ChildFailed:
        """An error saying `what`, with the last lines the process wrote."""
        code = self.process.returncode
        return ChildFailed(f"{what} (exit code {code}); output:\n    {self.output()}")

    def wait(self, deadline: float) -> int:
        """Wait for the process to exit by itself; TimeoutError past `deadline`."""
        try:
            return self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimeoutError("the process did not finish in time") from None

    def stop(self) -> int:
        """SIGTERM (the framework's runner drains on it), then SIGKILL to the whole group
        if it has not exited within 20 s. Returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=_STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL the process and everything it started (its group, led by it)."""
        # Only while the leader is not yet reaped: its pid, the group's id, cannot be reused.
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextlib.contextmanager
def running(argv: list[str], env: Mapping[str, str], log: Path) -> Iterator[Child]:
    """Start a child; on the way out stop it, or kill it if the block failed."""
    child = Child(argv, env, log)
    try:
        yield child
    except BaseException:
        child.kill()
        raise
    child.stop()


def wait_count(
    directory: Path, expected: int, deadline: float, child: Child
) -> list[dict[str, Any]]:
    """Wait until the processes recording into `directory` handled `expected` messages."""
    while True:
        stats = read_stats(directory)
        handled = sum(s["count"] for s in stats)
        if handled >= expected:
            return stats
        if not child.alive():
            raise child.failed(f"the consumer exited after {handled} of {expected} messages")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{handled} of {expected} messages handled when time ran out; the "
                f"consumer's last output:\n    {child.output()}"
            )
        time.sleep(0.02)


def peak_rss_kib(pid: int) -> int | None:
    """The peak resident set size of a running process (VmHWM), in KiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def cli() -> str:
    """The `amqp-listener` command of this interpreter's environment."""
    beside = Path(sys.executable).with_name("amqp-listener")
    found = str(beside) if beside.exists() else shutil.which("amqp-listener")
    if found is None:
        raise SystemExit("bench: no amqp-listener command; install the package (make install)")
    return found
