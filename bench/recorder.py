"""What every consumer process calls per message, and how its results reach the parent.

The framework's handlers and the hand-written baselines call the same `RECORDER.hit()`, so
both pay the same for being measured: a monotonic clock read and an uncontended lock.

Results travel through files in `BENCH_STATS_DIR`, not through the process's exit: on its
first call in a process the recorder starts a daemon thread that rewrites
`stats-<pid>.json` every 20 ms (atomically, by rename) and appends new latency samples to
`samples-<pid>.bin`. The parent therefore has every number before it stops the consumer,
and a worker stopped by SIGTERM (or killed) cannot take its results with it. The clock is
`time.monotonic()` (CLOCK_MONOTONIC, one clock for every process on Linux), so first and
last calls compare across the worker processes of one run.

With `BENCH_PROFILE` set, the first call also starts cProfile on the calling thread (the
event loop's, for async handlers), and call number `BENCH_EXPECT` stops it and writes
`profile-<pid>.prof`: a profile of the steady state between the first and the last message.
"""

from __future__ import annotations

import array
import asyncio
import cProfile
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["RECORDER", "Recorder", "read_samples", "read_stats"]

ENV_DIR = "BENCH_STATS_DIR"
ENV_EXPECT = "BENCH_EXPECT"
ENV_PROFILE = "BENCH_PROFILE"
_TICK = 0.02


class Recorder:
    """Counts handler calls, times the first and the last, keeps latency samples."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.loop = ""
        self._samples = array.array("d")
        self._written = 0
        self._expect = 0
        self._profiler: cProfile.Profile | None = None
        self._directory: Path | None = None

    def hit(self, sent: float | None = None) -> None:
        """Record one handler call; `sent` is the publisher's `time.monotonic()`, if timed."""
        now = time.monotonic()
        with self._lock:
            if self._pid != os.getpid():  # the first call in this process (or after a fork)
                self._begin(now)
            self.count += 1
            self.last = now
            if sent is not None:
                self._samples.append(now - sent)
            if self.count == self._expect and self._profiler is not None:
                self._profiler.disable()
                self._profiler.dump_stats(self._path("profile", "prof"))
                self._profiler = None

    def _begin(self, now: float) -> None:
        self._pid = os.getpid()
        self.count, self.first, self.last = 0, now, now
        self._samples = array.array("d")
        self._written = 0
        self._directory = Path(os.environ[ENV_DIR])
        self._expect = int(os.environ.get(ENV_EXPECT, "0"))
        try:
            loop = asyncio.get_running_loop()
            self.loop = f"{type(loop).__module__}.{type(loop).__qualname__}"
        except RuntimeError:
            self.loop = "thread"  # a sync handler: the worker's loop is not visible from here
        threading.Thread(target=self._report, name="bench-recorder", daemon=True).start()
        if os.environ.get(ENV_PROFILE) and self._expect > 1:
            self._profiler = cProfile.Profile()
            self._profiler.enable()

    def _path(self, kind: str, suffix: str) -> Path:
        assert self._directory is not None
        return self._directory / f"{kind}-{self._pid}.{suffix}"

    def _report(self) -> None:
        while True:
            time.sleep(_TICK)
            self.flush()

    def flush(self) -> None:
        """Write the current numbers (called by the reporting thread)."""
        with self._lock:
            stats = {
                "pid": self._pid,
                "count": self.count,
                "first": self.first,
                "last": self.last,
                "loop": self.loop,
            }
            new = self._samples[self._written :]
            self._written = len(self._samples)
        if new:
            with self._path("samples", "bin").open("ab") as out:
                new.tofile(out)
        path = self._path("stats", "json")
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(stats))
        os.replace(scratch, path)


#: The one recorder of this process.
RECORDER = Recorder()


def read_stats(directory: Path) -> list[dict[str, Any]]:
    """The latest numbers of every process that recorded into `directory`."""
    found = []
    for path in sorted(directory.glob("stats-*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            continue  # replaced between the glob and the read; the next poll sees it
    return found


def read_samples(directory: Path) -> list[float]:
    """Every latency sample (seconds) written into `directory`, process by process."""
    samples = array.array("d")
    for path in sorted(directory.glob("samples-*.bin")):
        data = path.read_bytes()
        samples.frombytes(data[: len(data) - len(data) % samples.itemsize])
    return samples.tolist()
