"""A listener for supervisor tests (`amqp-listener run tests.apps.fleet --workers N`).

Configured from the environment at import, like tests/apps/gated.py:

    APP_EXCHANGE      the listener subscribes to `<APP_EXCHANGE>.work`
    APP_QUEUE         the queue it owns
    APP_MARKER_DIR    where the handler reports progress as files the test waits for:
                      `started-<n>-<pid>-<ns>` when message n begins, `done-<n>-<pid>-<ns>`
                      when it ends (one file per handling, so duplicates can be counted)
    APP_MAX_ATTEMPTS  (default 2), APP_CONCURRENCY (default 1), APP_TIMEOUT (default 30)

A message is `{"n": 1, "action": "...", "seconds": 0.0}`, the action one of:

    ok     return at once
    sleep  sleep `seconds`, then return
    wait   block until the file `release-<n>` appears in APP_MARKER_DIR (at most 60 s)
    crash  os._exit(70): the process vanishes without unwinding, like a segfault would
    kill   SIGKILL this worker process, as the kernel's OOM killer would
    exit   raise SystemExit(3) (the worker stops itself with exit code 1)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from listener import Listener

MARKERS = Path(os.environ["APP_MARKER_DIR"])
HOLD_LIMIT = 60.0


class Task(BaseModel):
    n: int
    action: Literal["ok", "sleep", "wait", "crash", "kill", "exit"] = "ok"
    seconds: float = 0.0


def _mark(event: str, n: int) -> None:
    pid = os.getpid()
    (MARKERS / f"{event}-{n}-{pid}-{time.monotonic_ns()}").write_text(str(pid))


class Fleet(Listener):
    subscribes_to = f"{os.environ['APP_EXCHANGE']}.work"
    queue = os.environ["APP_QUEUE"]
    max_attempts = int(os.environ.get("APP_MAX_ATTEMPTS", "2"))
    concurrency = int(os.environ.get("APP_CONCURRENCY", "1"))
    timeout = float(os.environ.get("APP_TIMEOUT", "30"))
    retry_delays = (0.1,)

    def handle(self, message: Task) -> None:
        _mark("started", message.n)
        if message.action == "sleep":
            time.sleep(message.seconds)
        elif message.action == "wait":
            release = MARKERS / f"release-{message.n}"
            deadline = time.monotonic() + HOLD_LIMIT
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        elif message.action == "crash":
            os._exit(70)
        elif message.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif message.action == "exit":
            sys.exit(3)
        _mark("done", message.n)
