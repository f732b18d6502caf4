"""Blame for a worker's death: only the message that provably killed it is charged.

RabbitMQ's `x-delivery-count` goes up for *every* unacked delivery of a connection that
died, so it cannot tell the message that killed a worker from the ones that merely ran
beside it, sat in its prefetch, or were in flight on a lost connection. Blame is therefore
decided by the runner itself, from what it knows for certain:

1. **The journal.** Each worker records the deliveries it is running (not the ones it
   merely holds) in shared memory (`listener.runner.journal`). When a worker dies (a
   signal, an exit it did not choose), its supervisor reads that journal.
2. **Suspects.** Every delivery that was running at a death becomes a suspect in a table
   the supervisor keeps for all its workers (`Suspects`, a small file beside the journals).
   A death with exactly one delivery running is blamed on that delivery, and on nothing
   else: nothing else of the worker's ran then.
3. **Isolation.** When a suspect is delivered again to any worker of that runner, the
   worker runs it *alone* (`Gate`): it lets the handlers already running finish, starts
   nothing else meanwhile, and then runs the suspect by itself. If the worker dies now, the
   suspect was the only delivery running, so the death is blamed on it. After
   `max_attempts` blamed deaths (attempts it failed in the usual way count too) the next
   delivery parks it as `worker_lost`.

What this never charges: messages that were only prefetched (not in the journal), messages
paused, stopped or reloaded (handed back as fresh copies, never redelivered), messages in
flight on a lost connection (the worker lives on, so nothing is read from its journal), and
messages running beside a poison message (suspects, which then run alone once each and are
cleared by their own success). A lost connection never turns a worker's in-flight set into
suspects at all.

What it cannot see: a death of the whole runner (the supervisor included, as an OOM kill of
a container or a `kill` of its process group does), or a suspect redelivered to a runner on
another host. The delivery limit covers those (`Listener.max_deliveries`, by default three
times `max_attempts`): a message delivered that many times without an outcome is parked
with the reason `delivery_limit`. Beside such a poison, the messages redelivered with it
after every runner death would reach that limit too: a redelivered message the runner has no
record of, delivered twice without an outcome, runs alone as well, after a random wait, so
that the innocent ones get their turn before the poison takes the runner down again
(`consumer.UNSEEN_DEATHS_ALONE`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from listener.runner.journal import Journal, Running, read

__all__ = ["Blame", "Gate", "Isolation", "Suspects"]

log = logging.getLogger("listener.supervisor")

#: Suspects are forgotten after this long (seconds): a message that has not come back in a
#: day was handled, retried or parked by now.
_SUSPECT_TTL = 24 * 3600.0
#: The table's size bound: the oldest suspects go first.
_SUSPECTS_MAX = 10_000


def _key(queue: str, message_id: str) -> str:
    # Two listeners bound to one key each get a copy with the same message id: a message
    # that kills one listener's worker is innocent for the other.
    return f"{queue}\0{message_id}"


class Suspects:
    """The supervisor's table of suspect deliveries: deaths blamed on each, shared with the
    workers through a file (written whole, then renamed into place).

    Args:
        path: the file; read back when it exists (a reload re-executes the supervisor).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._table: dict[str, list[float]] = _load(path)  # key -> [deaths, last seen]

    def __repr__(self) -> str:
        return f"<Suspects {self.path} n={len(self._table)}>"

    def deaths(self, queue: str, message_id: str) -> int | None:
        """Deaths blamed on a delivery; None when it is not a suspect."""
        entry = self._table.get(_key(queue, message_id))
        return None if entry is None else int(entry[0])

    def record_death(self, running: list[Running]) -> Running | None:
        """Take in a worker's death with `running` in its journal; returns the delivery
        blamed for it (the only one running), or None when none can be."""
        blamed = running[0] if len(running) == 1 else None
        now = time.time()
        for entry in running:
            row = self._table.setdefault(_key(entry.queue, entry.message_id), [0, now])
            row[1] = now
            if entry is blamed:
                row[0] += 1
        self._save(now)
        return blamed

    def _save(self, now: float) -> None:
        table = {k: v for k, v in self._table.items() if now - v[1] < _SUSPECT_TTL}
        if len(table) > _SUSPECTS_MAX:
            newest = sorted(table.items(), key=lambda item: item[1][1])[-_SUSPECTS_MAX:]
            table = dict(newest)
        self._table = table
        partial = self.path.with_suffix(".tmp")
        try:
            partial.write_text(json.dumps(table))
            partial.replace(self.path)
        except OSError as exc:
            log.warning(
                "could not write the table of suspect messages to %s (%s); a message that "
                "killed a worker will not run alone when it comes back",
                self.path,
                exc,
            )


class _SuspectsView:
    """A worker's read-only view of its supervisor's `Suspects` file, read again only when
    it changed, and only for redelivered messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: int | None = None
        self._table: dict[str, list[float]] = {}

    def deaths(self, queue: str, message_id: str) -> int | None:
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except OSError:
            return None
        if stamp != self._stamp:
            self._stamp = stamp
            self._table = _load(self.path)
        entry = self._table.get(_key(queue, message_id))
        return None if entry is None else int(entry[0])


def _load(path: Path) -> dict[str, list[float]]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {
        k: [float(v[0]), float(v[1])]
        for k, v in loaded.items()
        if isinstance(v, list) and len(v) == 2
    }


class Gate:
    """Lets a suspect run alone in its worker: ordinary deliveries share the gate, a suspect
    waits until nothing else runs and keeps everything else waiting until it is done.

    The ordinary path is two integer operations and no call: `suspects` is read (an
    ordinary delivery waits in `wait_open()` while it is not 0), then `running` is raised.
    """

    __slots__ = ("_solo", "_waiters", "running", "suspects")

    def __init__(self) -> None:
        self.running = 0  # ordinary deliveries running now
        self.suspects = 0  # suspects waiting for their turn, or running
        self._solo = False  # a suspect runs now
        self._waiters: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        return f"<Gate running={self.running} suspects={self.suspects} solo={self._solo}>"

    async def wait_open(self) -> None:
        """Wait until no suspect waits or runs."""
        while self.suspects:
            await self._changed()

    def leave(self) -> None:
        """An ordinary delivery's attempt ended."""
        self.running -= 1
        if self.suspects and not self.running:
            self._wake()

    async def enter_alone(self) -> None:
        """Wait until nothing else runs in this worker, then hold everything else back."""
        self.suspects += 1
        try:
            while self.running or self._solo:
                await self._changed()
        except BaseException:
            self.suspects -= 1
            self._wake()
            raise
        self._solo = True

    def leave_alone(self) -> None:
        """The suspect's attempt ended: the others may run again."""
        self._solo = False
        self.suspects -= 1
        self._wake()

    async def _changed(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class Isolation:
    """A supervised worker's side of blame: its journal, its gate and its view of the
    supervisor's suspects. Shared by every consumer of the worker."""

    def __init__(self, runtime: Path, slots: int) -> None:
        self.journal = Journal(journal_path(runtime, os.getpid()), slots)
        self.gate = Gate()
        self._suspects = _SuspectsView(suspects_path(runtime))

    def __repr__(self) -> str:
        return f"<Isolation {self.journal!r} {self.gate!r}>"

    def deaths(self, queue: str, message_id: str) -> int | None:
        """Deaths blamed on a redelivered message; None when it is not a suspect."""
        return self._suspects.deaths(queue, message_id)

    def close(self) -> None:
        self.journal.close()


def _remove_orphans(base: Path) -> None:
    """Delete the files of runners whose supervisor was killed before it could."""
    for runtime in base.glob(f"amqp-listener-{os.getuid()}-*"):
        try:
            pid = int(runtime.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(runtime, ignore_errors=True)
        except OSError:
            continue


def journal_path(runtime: Path, pid: int) -> Path:
    """Where worker `pid` of the runner whose files live in `runtime` keeps its journal."""
    return runtime / f"journal-{pid}"


def suspects_path(runtime: Path) -> Path:
    """Where the runner whose files live in `runtime` keeps its suspects."""
    return runtime / "suspects.json"


class Blame:
    """The supervisor's side: the runner's files (journals, suspects) and the verdict on
    each worker that ended.

    Args:
        supervisor: the supervisor's pid; the files live in a directory named after it, so
            that a reload (which re-executes the supervisor under the same pid) finds them.
        fresh: start with an empty directory (False after a reload).
        on_lost: told of the deliveries each worker death interrupted (the job ledger
            records them as `worker_lost` attempts).
    """

    def __init__(
        self,
        supervisor: int,
        *,
        fresh: bool,
        on_lost: Callable[[int, list[Running]], None] | None = None,
    ) -> None:
        base = Path(tempfile.gettempdir())
        self.runtime = base / f"amqp-listener-{os.getuid()}-{supervisor}"
        if fresh:
            shutil.rmtree(self.runtime, ignore_errors=True)
            _remove_orphans(base)
        self.runtime.mkdir(mode=0o700, exist_ok=True)
        self.suspects = Suspects(suspects_path(self.runtime))
        self._on_lost = on_lost

    def __repr__(self) -> str:
        return f"<Blame {self.runtime} {self.suspects!r}>"

    def worker_ended(self, pid: int, *, died: bool) -> Running | None:
        """Take in the end of worker `pid`: when it `died` (rather than stopped, was
        stopped by the supervisor, or asked to be replaced), what it was running becomes
        suspect, and the delivery it ran alone is blamed. Returns the blamed delivery."""
        path = journal_path(self.runtime, pid)
        running = read(path) if died else []
        with contextlib.suppress(OSError):
            path.unlink()
        if not running:
            return None
        blamed = self.suspects.record_death(running)
        if blamed is not None:
            log.warning(
                "worker pid=%d died while message %s (queue %s) was the only one running: "
                "the death is blamed on it (%d so far); it runs alone when it comes back",
                pid,
                blamed.message_id,
                blamed.queue,
                self.suspects.deaths(blamed.queue, blamed.message_id) or 0,
            )
        else:
            log.warning(
                "worker pid=%d died while %d messages were running (%s); none is blamed: "
                "each runs alone when it comes back",
                pid,
                len(running),
                ", ".join(entry.message_id for entry in running[:8]),
            )
        if self._on_lost is not None:
            try:
                self._on_lost(pid, running)
            except Exception:
                log.exception("recording the deliveries lost with worker pid=%d failed", pid)
        return blamed

    def remove(self) -> None:
        """Delete the runner's files (at the supervisor's exit)."""
        shutil.rmtree(self.runtime, ignore_errors=True)
