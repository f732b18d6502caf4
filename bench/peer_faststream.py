"""FastStream (RabbitBroker, on aio-pika): `python -m bench.peer_faststream ROLE`.

* consume: `FastStream(broker).run()` with one async subscriber that does nothing, on the
  framework's quorum queue (declared by the parent; `declare=False` only checks it exists),
  prefetch `BENCH_PREFETCH`, its default ack policy (ack after the handler returned).
  FastStream logs two lines per message by default (its access log); `logger=None` turns
  its logging off here, as a service tuned for throughput would run it.
* no fill: FastStream reads any JSON body, so the parent pre-fills as for raw aio-pika.
* publish: `await broker.publish(...)` one at a time, persistent, mandatory, on its default
  channel, which has publisher confirms: each call returns once the broker confirmed.
"""

from __future__ import annotations

import asyncio
import os
import time

from faststream import FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitExchange, RabbitQueue

from bench import peers
from bench.recorder import RECORDER
from bench.wire import item, url


def _broker() -> RabbitBroker:
    prefetch = int(os.environ.get("BENCH_PREFETCH", "100"))
    return RabbitBroker(url(), default_channel=Channel(prefetch_count=prefetch), logger=None)


def consume(where: peers.Where) -> None:
    """Run the worker until SIGTERM."""
    broker = _broker()

    @broker.subscriber(RabbitQueue(where.queue, declare=False))
    async def noop(body):  # no annotation: the decoded JSON value
        RECORDER.hit()

    asyncio.run(FastStream(broker).run())


async def _publish(where: peers.Where, count: int) -> float:
    exchange = RabbitExchange(where.exchange, declare=False)
    values = [item(n) for n in range(count + 1)]
    async with _broker() as broker:

        async def send(value: dict[str, object]) -> None:
            await broker.publish(
                value,
                exchange=exchange,
                routing_key=where.routing_key,
                persist=True,
                mandatory=True,
            )

        await send(values[0])
        start = time.monotonic()
        for value in values[1:]:
            await send(value)
        return time.monotonic() - start


def publish(where: peers.Where, count: int) -> float:
    """Seconds for `count` confirmed publishes, after one untimed warm-up."""
    return asyncio.run(_publish(where, count))


if __name__ == "__main__":
    peers.main("python -m bench.peer_faststream", publish, consume=consume)
