"""What a worker is running right now, kept where its supervisor can read it after a death.

A worker process writes one entry when a handler starts and clears it when the attempt
ends; the entries live in a small file mapped into memory (`mmap`), so that writing one is
a few stores into memory, not a system call, and so that they are still there, whole, after
the process was killed with SIGKILL, crashed in C code or was ended by the kernel's OOM
killer. The supervisor reads the file of a worker that died (`read`) and knows which
deliveries were *running* then, as opposed to merely prefetched or waiting: the only ones
that may have killed it (see `listener.runner.blame`).

Layout: `slots` fixed-size entries. An entry is a state byte (0 free, 1 running), the start
time (`time.monotonic()`, a double: the clock every process of the machine shares; `read`
turns it into seconds since the epoch), the length of its key and the key itself, the
queue and the message id separated by a NUL. The state byte is written last when an entry
begins and cleared first when it ends, so a reader never sees half an entry as running.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Journal", "Running", "read"]

_HEAD = struct.Struct("<BdH")
_SLOT = 256
_KEY_MAX = _SLOT - _HEAD.size


@dataclass(frozen=True, slots=True)
class Running:
    """One delivery a worker was running: its queue, message id and start time (epoch s)."""

    queue: str
    message_id: str
    started_at: float


class Journal:
    """The running deliveries of this worker process, in a memory-mapped file.

    Args:
        path: the file (created, or truncated, here).
        slots: entries at most; more deliveries running at once go unrecorded.
    """

    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        self._free = list(range(slots - 1, -1, -1))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, slots * _SLOT)
            self._map = mmap.mmap(fd, slots * _SLOT)
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return f"<Journal {self.path} free={len(self._free)}>"

    def begin(self, queue: str, message_id: str, started: float) -> int:
        """Record that a handler starts on this delivery at `started` (`time.monotonic()`,
        which every process of the machine shares); returns the entry (-1: none free)."""
        if not self._free:
            return -1
        index = self._free.pop()
        key = f"{queue}\0{message_id}".encode(errors="replace")[:_KEY_MAX]
        offset = index * _SLOT
        start = offset + _HEAD.size
        self._map[start : start + len(key)] = key
        _HEAD.pack_into(self._map, offset, 0, started, len(key))
        self._map[offset] = 1
        return index

    def end(self, index: int) -> None:
        """The attempt recorded at `index` ended (however it ended)."""
        if index >= 0:
            self._map[index * _SLOT] = 0
            self._free.append(index)

    def close(self) -> None:
        """Unmap and remove the file (a worker that stops cleanly leaves nothing behind)."""
        with contextlib.suppress(Exception):
            self._map.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def read(path: Path) -> list[Running]:
    """The deliveries recorded as running in the journal at `path` (empty when there is none)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    running = []
    to_wall_clock = time.time() - time.monotonic()
    for offset in range(0, len(data) - _SLOT + 1, _SLOT):
        state, started, length = _HEAD.unpack_from(data, offset)
        if state != 1 or length > _KEY_MAX:
            continue
        start = offset + _HEAD.size
        queue, _, message_id = data[start : start + length].decode(errors="replace").partition("\0")
        running.append(Running(queue, message_id, started + to_wall_clock))
    return running
