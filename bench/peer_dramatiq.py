"""Dramatiq (RabbitmqBroker, on pika): the module `dramatiq bench.peer_dramatiq` hosts.

* consume: `dramatiq bench.peer_dramatiq --processes 1`, its default 8 threads, its default
  middleware plus `AsyncIO` for the async no-op actor; prefetch `BENCH_PREFETCH` (the parent
  sets `dramatiq_queue_prefetch`, Dramatiq's own setting). Dramatiq acks after the actor
  returned.
* fill: `noop.send(...)`, persistent, without confirms (Dramatiq's default).
* publish: `noop.send(...)` one at a time with `confirm_delivery=True`: each call returns
  once the broker confirmed; Dramatiq then also sets the mandatory flag.

Dramatiq declares its queues itself (the queue, `.DQ` for delays, `.XQ` for dead messages),
through the default exchange, with arguments of its own. Its broker has no setting for the
queue type: `_QuorumBroker` adds `x-queue-type: quorum` to the arguments it declares the
queue and its delay queue with, so that every consume row of the bench reads a quorum queue.
"""

from __future__ import annotations

import time
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware.asyncio import AsyncIO

from bench import peers
from bench.recorder import RECORDER
from bench.wire import item, url


class _QuorumBroker(RabbitmqBroker):
    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        return {**super()._build_queue_arguments(queue_name), "x-queue-type": "quorum"}


BROKER = _QuorumBroker(url=url())
BROKER.add_middleware(AsyncIO())
dramatiq.set_broker(BROKER)


@dramatiq.actor(queue_name=peers.where().queue)
async def noop(value: Any) -> None:
    RECORDER.hit()


def fill(where: peers.Where, count: int) -> None:
    """Send `count` messages, untimed."""
    for n in range(count):
        noop.send(item(n))
    BROKER.close()


def publish(where: peers.Where, count: int) -> float:
    """Seconds for `count` confirmed sends, after one untimed warm-up."""
    BROKER.confirm_delivery = True  # the constructor's parameter; read when a channel opens
    values = [item(n) for n in range(count + 1)]
    noop.send(values[0])
    start = time.monotonic()
    for value in values[1:]:
        noop.send(value)
    seconds = time.monotonic() - start
    BROKER.close()
    return seconds


if __name__ == "__main__":
    peers.main("python -m bench.peer_dramatiq", publish, fill=fill)
