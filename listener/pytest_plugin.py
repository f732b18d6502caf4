"""pytest fixtures for testing listeners without RabbitMQ (see `listener.testing`).

Installed with the package (a `pytest11` entry point), so every pytest run in an
environment that has amqp-listener can use them:

    def test_copies_the_file(memory_broker):
        memory_broker.subscribe(FileCopier)
        FileCopier.notify(case_id=7, src="a", dst="b")
        memory_broker.join()
        assert len(memory_broker.handled(FileCopier)) == 1
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from listener.testing import MemoryBroker

__all__ = ["memory_broker"]


@pytest.fixture
def memory_broker() -> Iterator[MemoryBroker]:
    """An active `MemoryBroker` (fail_fast) with no listener subscribed; closed after the test.

    While the test runs, `notify()` and `listener.publish()` go to it, not to RabbitMQ.
    """
    # Imported here, so that pytest runs that never use the fixture do not load the package.
    from listener.testing import MemoryBroker

    with MemoryBroker() as broker:
        yield broker
