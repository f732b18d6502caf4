"""Waiting longer after each failure: one back-off for start-up retries, reconnects and
restarts.

A delay doubles from `first` up to `cap` after each failure, and each wait is spread by a
random factor (`jitter`) so that many workers, or many runners, that failed together do not
try again in lock-step and fail together once more. `reset()` starts over after a success.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Delays of `first`, `2 * first`, ... up to `cap` seconds, each times a random factor
    from `jitter`, at most `cap`."""

    first: float
    cap: float
    jitter: tuple[float, float] = (0.8, 1.2)
    #: The delay before jitter of the last wait; 0 before the first failure.
    delay: float = 0.0

    def next(self) -> float:
        """Seconds to wait after one more failure."""
        self.delay = min(self.delay * 2, self.cap) if self.delay else self.first
        return min(self.delay * random.uniform(*self.jitter), self.cap)

    def reset(self) -> None:
        """A success: the next failure waits `first` again."""
        self.delay = 0.0
