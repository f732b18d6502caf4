"""The status pipe: how a forked worker tells its supervisor that it consumes, or why not.

Each worker gets the write end of a pipe of its own at the fork; the supervisor keeps the
read end, non-blocking, and reads it on every wake-up. One report is one line, short enough
for one atomic pipe write (`REPORT_MAX`):

    ready                     consuming on every listener
    paused                    connected, consuming nothing on purpose (counts as started)
    not-ready <reason>        a reconnect, a consumer being re-subscribed, stopping, ...
    error <Class> <message>   the start-up error it met (a `listener.errors` class name)

A worker writes "ready" once it consumes and again whenever its readiness changes. Some
start-up errors only a worker can meet (the supervisor's check declares but does not
consume, because consuming would take messages: a queue held by an exclusive consumer, read
permission refused); those travel as "error" lines and are rebuilt, class included, on the
supervisor's side (`boot_error`). After each change a worker also sends its supervisor a
SIGCHLD (`tell`), whose only effect is to wake it to read the report at once: the health
endpoint then sees the change within milliseconds, not at the next tick.

A pipe rather than signals or shared memory: it carries a reason, it tells the supervisor
when the worker is gone (end of file), and it survives a reload's re-exec as a plain file
descriptor.
"""

from __future__ import annotations

import contextlib
import os
import signal

from listener import errors
from listener.errors import BrokerError

__all__ = ["REPORT_MAX", "StatusReader", "boot_error", "report", "report_error", "tell"]

#: A status report must fit one atomic pipe write.
REPORT_MAX = 2048


def report(fd: int, line: str) -> None:
    """In a worker: write one report line (cut to fit one atomic write; never raises)."""
    data = line.encode(errors="replace")[: REPORT_MAX - 1] + b"\n"
    with contextlib.suppress(OSError):
        os.write(fd, data)


def report_error(fd: int, name: str, message: str) -> None:
    """In a worker: report the start-up error it met, as its class name and message."""
    report(fd, f"error {name} {message}")


def tell(fd: int, state: str, supervisor: int) -> None:
    """In a worker: report a readiness change, and wake the supervisor to read it.

    SIGCHLD is the wake-up call: the supervisor takes it synchronously anyway, reads the
    reports of every worker when it does, and its default action elsewhere is to be
    ignored, so a stray one harms nothing.
    """
    report(fd, state)
    if os.getppid() == supervisor:
        with contextlib.suppress(OSError):
            os.kill(supervisor, signal.SIGCHLD)


class StatusReader:
    """In the supervisor: the read end of one worker's status pipe, non-blocking."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        self._pending = b""  # a partial report line

    def read(self) -> list[tuple[str, str]]:
        """The complete lines the worker wrote since the last read, as (kind, detail). A
        partial line waits for the next read; at end of file the read end is closed."""
        if self.fd is None:
            return []
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                break
            self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        reports = []
        for line in lines:
            kind, _, detail = line.decode(errors="replace").partition(" ")
            reports.append((kind, detail))
        return reports

    def close(self) -> None:
        """Close the read end (once; one already closed is ignored)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def boot_error(detail: str) -> BrokerError:
    """Rebuild a worker's start-up error ("<Class> <message>") in the supervisor, keeping its
    class."""
    name, _, message = detail.partition(" ")
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, BrokerError):
        with contextlib.suppress(Exception):
            return cls(message)
    return BrokerError(message)
