"""Where `notify()` and `publish()` send messages while a test broker is active.

The default publishers (`default_publisher()`, `default_async_publisher()`,
`run_in_background()`) look at `active` first. It is None in production, so the cost there
is one attribute read; `listener.testing.MemoryBroker` sets it while it is entered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from listener.apublisher import AsyncPublisher
    from listener.publisher import Publisher

__all__ = ["Target", "active"]

T = TypeVar("T")


class Target(Protocol):
    """What a test broker offers in place of the real publishers."""

    @property
    def publisher(self) -> Publisher:
        """Used by `notify()` and `listener.publish()`."""
        ...

    @property
    def async_publisher(self) -> AsyncPublisher:
        """Used by `anotify()`, `anotify_many()` and `listener.apublish()`."""
        ...

    def run_batch(self, work: Callable[[AsyncPublisher], Awaitable[T]]) -> T:
        """Used by `notify_many()`: run `work` against the async publisher, synchronously."""
        ...


#: The active test broker, or None (production).
active: Target | None = None
