"""A listener for process-level tests, configured from the environment at import.

The test process starts `amqp-listener run tests.apps.gated` with:

    APP_EXCHANGE      the listener subscribes to `<APP_EXCHANGE>.work`
    APP_QUEUE         the queue it owns
    APP_MARKER_DIR    where the handler reports progress as files the test waits for:
                      `started-<n>-<pid>` when message n begins, `done-<n>-<pid>` when it ends
    APP_MAX_ATTEMPTS  (default 2), APP_CONCURRENCY (default 4), APP_TIMEOUT (default 30)

A message is `{"n": 1, "action": "..."}`, the action one of:

    ok    return at once
    wait  block until the file `release-<n>` appears in APP_MARKER_DIR (at most 60 s)
    exit  raise SystemExit(3)
    die   SIGKILL this worker process, as the kernel's OOM killer would
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


class Job(BaseModel):
    n: int
    action: Literal["ok", "wait", "exit", "die"] = "ok"


def _mark(event: str, n: int) -> None:
    (MARKERS / f"{event}-{n}-{os.getpid()}").write_text(str(os.getpid()))


class Gated(Listener):
    subscribes_to = f"{os.environ['APP_EXCHANGE']}.work"
    queue = os.environ["APP_QUEUE"]
    max_attempts = int(os.environ.get("APP_MAX_ATTEMPTS", "2"))
    concurrency = int(os.environ.get("APP_CONCURRENCY", "4"))
    timeout = float(os.environ.get("APP_TIMEOUT", "30"))
    retry_delays = (0.1,)

    def handle(self, message: Job) -> None:
        _mark("started", message.n)
        if message.action == "wait":
            release = MARKERS / f"release-{message.n}"
            deadline = time.monotonic() + HOLD_LIMIT
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        elif message.action == "exit":
            sys.exit(3)
        elif message.action == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        _mark("done", message.n)
