"""The listeners `amqp-listener run bench.apps --listener NAME` hosts during a measurement.

Configured from the environment at import, like any deployed application:

    BENCH_TOKEN     the measurement's token (`bench.names`): exchange and queue names
    BENCH_PREFETCH  `concurrency`, the prefetch per worker (default 100)

Each handler does nothing but `RECORDER.hit()`, which the hand-written baselines call too.
"""

from __future__ import annotations

import os

from pydantic import BaseModel

from bench.names import RETRY_DELAYS, target
from bench.recorder import RECORDER
from listener import Listener

TOKEN = os.environ.get("BENCH_TOKEN", "bench-unset")
PREFETCH = int(os.environ.get("BENCH_PREFETCH", "100"))


class Item(BaseModel):
    """The body every consume measurement is pre-filled with: `{"n": 1, "name": "item-1"}`."""

    n: int
    name: str


class Probe(BaseModel):
    """A latency probe: `t` is the publisher's `time.monotonic()` just before it sent."""

    n: int
    t: float


class BenchListener(Listener, abstract=True):
    """The settings every bench listener shares."""

    concurrency = PREFETCH
    retry_delays = RETRY_DELAYS


# Each listener works on `<TOKEN>.<its class name>` (`Case.place` in bench.cases).
ASYNC, SYNC, MODEL, LATENCY, SINK = (
    target(TOKEN, name) for name in ("AsyncNoop", "SyncNoop", "ModelNoop", "LatencyProbe", "Sink")
)


class AsyncNoop(BenchListener):
    """An async handler that does nothing (the body is decoded as plain JSON)."""

    subscribes_to = ASYNC.address
    queue = ASYNC.queue

    async def handle(self, message):  # no annotation: the decoded JSON value
        RECORDER.hit()


class SyncNoop(BenchListener):
    """A sync handler that does nothing; it runs on a thread, as every sync handler does."""

    subscribes_to = SYNC.address
    queue = SYNC.queue

    def handle(self, message):  # no annotation: the decoded JSON value
        RECORDER.hit()


class ModelNoop(BenchListener):
    """An async handler whose message is validated into a pydantic model first."""

    subscribes_to = MODEL.address
    queue = MODEL.queue

    async def handle(self, message: Item) -> None:
        RECORDER.hit()


class LatencyProbe(BenchListener):
    """An async handler that records how long each probe took from its publisher."""

    subscribes_to = LATENCY.address
    queue = LATENCY.queue

    async def handle(self, message: Probe) -> None:
        RECORDER.hit(message.t)


class Sink(BenchListener):
    """The listener the publish measurements notify (never consumed during them)."""

    subscribes_to = SINK.address
    queue = SINK.queue

    async def handle(self, message: Item) -> None:
        RECORDER.hit()
