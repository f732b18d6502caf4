"""Celery (py-amqp transport): the app `celery -A bench.peer_celery worker` hosts.

* consume: `celery worker --pool solo` (one process, tasks run in it one at a time), without
  gossip, mingle and heartbeat, log level WARNING. The task is a plain function: Celery has
  no async tasks. `task_acks_late` acks after the task returned, as the framework does
  (Celery's default acks before running it); the prefetch is `BENCH_PREFETCH` (the
  multiplier, times the pool's one process).
* fill: `noop.apply_async(...)`, persistent (Celery's default), without confirms.
* publish: `noop.apply_async(...)` one at a time with the transport's `confirm_publish`:
  each call returns once the broker confirmed. Celery sets no mandatory flag.

The queue is the framework's quorum queue, declared by the parent (`no_declare`): Celery
publishes to its exchange with its routing key, and reads it with the consumer-level
prefetch that quorum queues need.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from bench import peers
from bench.recorder import RECORDER
from bench.wire import item, url

_WHERE = peers.where()
_QUEUE = Queue(
    _WHERE.queue,
    Exchange(_WHERE.exchange, type="topic", durable=True, no_declare=True),
    routing_key=_WHERE.routing_key,
    queue_arguments={"x-queue-type": "quorum"},
    no_declare=True,
)

app = Celery("bench", broker=url(), set_as_current=True)
app.conf.update(
    task_queues=[_QUEUE],
    task_default_queue=_WHERE.queue,
    task_acks_late=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "100")),
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=False,
)


@app.task(name="bench.noop", ignore_result=True)
def noop(value: Any) -> None:
    RECORDER.hit()


def fill(where: peers.Where, count: int) -> None:
    """Send `count` messages, untimed."""
    with app.producer_or_acquire() as producer:
        for n in range(count):
            noop.apply_async((item(n),), queue=_QUEUE, producer=producer)


def publish(where: peers.Where, count: int) -> float:
    """Seconds for `count` confirmed sends, after one untimed warm-up."""
    app.conf.broker_transport_options = {"confirm_publish": True}
    values = [item(n) for n in range(count + 1)]
    with app.producer_or_acquire() as producer:
        noop.apply_async((values[0],), queue=_QUEUE, producer=producer)
        start = time.monotonic()
        for value in values[1:]:
            noop.apply_async((value,), queue=_QUEUE, producer=producer)
        return time.monotonic() - start


if __name__ == "__main__":
    peers.main("python -m bench.peer_celery", publish, fill=fill)
