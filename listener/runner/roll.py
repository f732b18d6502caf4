"""The roll of a reload: replacing the workers of the old code one place at a time.

After a reload's re-exec (see `listener.runner.reload`) the new image runs the same N worker
places, still filled by workers of the old code, which keep consuming. The roll replaces
them in order: start the new worker of place 1, wait until it reports that it consumes,
SIGTERM the old worker of place 1 (it drains: its in-flight messages finish and are acked
within the grace period), then place 2, and so on. The queues never have fewer consumers
than before the reload. A replacement that cannot start is retried with back-off (by the
supervisor, like any worker) while the old worker it was to replace keeps consuming; an old
worker that dies before its replacement is ready has its replacement started next.

Kept apart from the supervision loop because it is the one part of the supervisor that
deals with two generations of workers at once; the loop only asks it to move on.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from listener.runner.child import ChildProcess

if TYPE_CHECKING:
    from listener.listener import Listener

__all__ = ["Roll"]

log = logging.getLogger("listener.supervisor")


class Roll:
    """The workers of the old code, by place, and the order in which they are replaced.

    `spawn(slot)` starts a new worker in a place (the supervisor's, with its back-off).
    """

    def __init__(
        self,
        slots: Sequence[ChildProcess],
        spawn: Callable[[ChildProcess], None],
        *,
        supervisor: int,
        listeners: Sequence[type[Listener]],
        grace_period: float,
    ) -> None:
        self.slots = slots
        self.spawn = spawn
        self.supervisor = supervisor
        self.listeners = listeners
        self.grace_period = grace_period
        self.old: dict[int, ChildProcess] = {}  # workers of the old code, by slot, not yet replaced
        self.retiring: list[ChildProcess] = []  # replaced workers, draining
        self.queue: list[int] = []  # slots whose new worker is yet to start, in order
        self.rolling: ChildProcess | None = None  # the slot whose new worker is starting
        self._halted = False

    @property
    def active(self) -> bool:
        """Whether a roll is under way: a place still has a worker of the old code."""
        return bool(self.queue) or self.rolling is not None or bool(self.old)

    def adopt(self, old: Sequence[ChildProcess], retiring: Sequence[ChildProcess]) -> None:
        """Take over the workers a previous image handed down."""
        for slot in old:
            if slot.number not in self.old:
                self.old[slot.number] = slot
            else:
                self.retiring.append(slot)
        self.retiring.extend(retiring)

    def begin(self) -> None:
        """Replace every place's worker, in order."""
        self.queue = [slot.number for slot in self.slots]
        log.info(
            "supervisor pid=%d re-executed: replacing %d worker(s) one at a time; each old "
            "one drains once its replacement consumes",
            self.supervisor,
            len(self.old),
        )
        self.advance()

    def halt(self) -> None:
        """The supervisor stops: start no more replacements (the old workers get its SIGTERM)."""
        self._halted = True
        self.queue = []
        self.rolling = None

    def advance(self) -> None:
        """Start the next new worker of a reload once the previous one is ready, and retire
        the old worker it replaces."""
        if self._halted or not self.active:
            return
        rolling = self.rolling
        if rolling is not None:
            if not rolling.started:
                return  # starting (or restarting with back-off): the old one keeps consuming
            self._retire(rolling)
            self.rolling = None
        while self.rolling is None and self.queue:
            slot = self.slots[self.queue.pop(0) - 1]
            if slot.pid is None and slot.restart_at is None:
                self.spawn(slot)
            if slot.started:
                self._retire(slot)
                continue
            self.rolling = slot
        if self.rolling is None and not self.queue:
            for number in sorted(self.old):  # more old workers than places (none usually)
                self._retire_unplaced(number)
            names = ", ".join(f"{cls.name()} ({cls.queue})" for cls in self.listeners)
            log.info(
                "supervisor pid=%d reloaded: %d worker(s) on the new code for: %s",
                self.supervisor,
                len(self.slots),
                names,
            )

    def old_died(self, slot: ChildProcess) -> bool:
        """Whether `slot` is an old worker that died before its replacement was ready; if so,
        that replacement comes next."""
        if self.old.get(slot.number) is not slot:
            return False
        del self.old[slot.number]
        if slot.number in self.queue:
            self.queue.remove(slot.number)
            self.queue.insert(0, slot.number)
        return True

    def retired(self, old: ChildProcess) -> None:
        """A worker of the old code ended: it drains no more."""
        if old in self.retiring:
            self.retiring.remove(old)

    def _retire(self, slot: ChildProcess) -> None:
        """SIGTERM the old worker of `slot`'s place: its replacement consumes."""
        old = self.old.pop(slot.number, None)
        if old is None or old.pid is None:
            return
        self.retiring.append(old)
        old.signal(signal.SIGTERM)
        log.info(
            "worker pid=%d replaced by pid=%d: draining (in-flight messages get %gs)",
            old.pid,
            slot.pid,
            self.grace_period,
        )

    def _retire_unplaced(self, number: int) -> None:
        """SIGTERM an old worker whose place the new fleet does not have."""
        old = self.old.pop(number, None)
        if old is None or old.pid is None:
            return
        self.retiring.append(old)
        old.signal(signal.SIGTERM)
        log.info("worker pid=%d has no place in the new fleet: draining", old.pid)
