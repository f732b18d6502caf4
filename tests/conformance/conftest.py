"""One interface over the in-memory broker and RabbitMQ, so that every conformance test runs
against both and the two must agree.

`broker` is parametrised three ways:

* `memory`: `MemoryBroker`, delivered with `await broker.ajoin()` (handlers on this loop);
* `memory-join`: `MemoryBroker`, delivered with `broker.join()` on a thread (handlers on the
  kit's private loop, whose idle waits are skipped);
* `rabbitmq`: an in-process `Worker` on the real broker, unique names, deleted afterwards.

A test declares its listeners, runs them with `async with broker.running(A, B):`, publishes
with the ordinary `notify()`/`anotify()`/`listener.apublish()` (or `broker.publish_raw`
for bodies no framework publisher would send), and waits with `await broker.until(...)`.
"""

from __future__ import annotations

import pytest
from conformance_harness import Harness, MemoryHarness, RabbitHarness


@pytest.fixture(
    params=["memory", "memory-join", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]
)
def broker(request: pytest.FixtureRequest) -> Harness:
    """The same small interface over the in-memory broker and RabbitMQ (see the module)."""
    if request.param == "rabbitmq":
        # Looked up here, so that the memory cases need no RabbitMQ.
        return RabbitHarness(
            request.getfixturevalue("run_worker"),
            request.getfixturevalue("rabbit"),
            request.getfixturevalue("settings"),
        )
    return MemoryHarness(request.param)
