"""The listener the fault suite runs in real processes (`amqp-listener run faults.app`).

Configured from the environment at import:

    FAULT_EXCHANGE     the listener subscribes to `<FAULT_EXCHANGE>.work`
    FAULT_QUEUE        the queue it owns
    FAULT_EVENTS_DIR   where each worker process appends its journal, `events-<pid>.log`
    FAULT_CONCURRENCY  messages in flight per worker (default 8, the listener default)
    FAULT_MAX_ATTEMPTS attempts before parking (default 5, the listener default)
    FAULT_OOM_CGROUP   a cgroup v1 memory directory the `oom` poison moves its worker into

The journal has one line per event, written with a single O_APPEND write (a kill -9 leaves
whole lines only): `start <id>` when handling begins, `done <id>` just before handle()
returns (so a message handled but not yet acked when its worker dies shows up twice once it
is redelivered: a duplicate), `bad <id>` for a body that arrived incomplete or altered,
`fail <id>` when a message marked `fail_first` raises on its first attempt (the first in all
worker processes: a `failed-<id>` file created with O_EXCL says it happened).

A message with `poison` set kills its worker on every attempt, the way real poison does:
`exit` (os._exit, a process that vanishes without unwinding), `segv` (a segmentation fault
in C code), `abort` (os.abort(), SIGABRT), `oom` (allocates until the kernel's OOM killer
ends the worker, inside the memory cgroup FAULT_OOM_CGROUP) or `runner` (takes the whole
runner down, its supervisor first, as an OOM kill of a container would).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

from faults.payload import Item, intact
from listener import Listener, Reject

EVENTS = Path(os.environ["FAULT_EVENTS_DIR"])


def record(event: str, message_id: str) -> None:
    fd = os.open(EVENTS / f"events-{os.getpid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{event} {message_id}\n".encode())
    finally:
        os.close(fd)


def first_failure(message_id: str) -> bool:
    """True once per message id, across processes."""
    try:
        os.close(os.open(EVENTS / f"failed-{message_id}", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


class FaultTarget(Listener):
    subscribes_to = f"{os.environ['FAULT_EXCHANGE']}.work"
    queue = os.environ["FAULT_QUEUE"]
    concurrency = int(os.environ.get("FAULT_CONCURRENCY", "8"))
    max_attempts = int(os.environ.get("FAULT_MAX_ATTEMPTS", "5"))
    retry_delays = (0.1,)
    timeout = 30

    def handle(self, message: Item) -> None:
        record("start", message.id)
        if not intact(message):
            record("bad", message.id)
            raise Reject("the body arrived incomplete or altered")
        if message.poison:
            die(message.poison)
        if message.sleep:
            time.sleep(message.sleep)
        if message.fail_first and first_failure(message.id):
            record("fail", message.id)
            raise RuntimeError("fails on its first attempt")
        record("done", message.id)


def die(how: str) -> None:
    """Kill this worker process the way poison `how` does."""
    if how == "exit":
        os._exit(70)
    elif how == "segv":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    elif how == "abort":
        os.abort()
    elif how == "runner":
        os.kill(os.getppid(), signal.SIGKILL)  # the supervisor; its workers follow it
        os._exit(70)
    elif how == "oom":
        cgroup = Path(os.environ["FAULT_OOM_CGROUP"])
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        hoard = []
        while True:  # the kernel's OOM killer ends this with SIGKILL
            hoard.append(bytearray(8 * 1024 * 1024))
    raise AssertionError(f"unknown poison {how!r}")
