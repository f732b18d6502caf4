"""The in-memory transport: where a moved copy lands, and how a delivery is settled."""

from __future__ import annotations

import aio_pika
import pytest

from listener import delay
from listener._memory_broker import Envelope, Store
from listener._memory_transport import MemoryTransport
from listener.errors import Unroutable
from listener.listener import Listener
from listener.runner.transport import Incoming


class Moved(Listener):
    subscribes_to = "moves.job"
    retry_delays = (5,)

    def handle(self, message: dict[str, int]) -> None: ...


def transport() -> MemoryTransport:
    store = Store()
    store.add_listener(Moved)
    return MemoryTransport(store)


def copy(headers: dict[str, object] | None = None) -> aio_pika.Message:
    return aio_pika.Message(
        b'{"n": 1}', headers=headers or {}, message_id="m-1", content_type="application/json"
    )


def envelope() -> Envelope:
    return Envelope(b'{"n": 1}', {}, "m-1", "application/json", None, "moves", "job")


async def test_a_copy_moved_to_the_listeners_queue_is_ready_at_once():
    memory = transport()
    await memory.publish_to_queue(Moved.queue, copy())
    cls, queued = memory.store.take(wait_for_retries=False) or (None, None)
    assert cls is Moved and queued is not None
    assert (queued.exchange, queued.routing_key, queued.message_id) == ("", Moved.queue, "m-1")


async def test_a_copy_moved_to_a_retry_delay_queue_waits_that_delay_on_the_virtual_clock():
    memory = transport()
    await memory.publish_to_queue(f"{Moved.queue}.retry.5s", copy())
    assert memory.store.take(wait_for_retries=False) is None
    assert memory.store.take(wait_for_retries=True) is not None
    assert memory.store.clock.now == 5


async def test_a_copy_moved_to_the_delay_levels_waits_as_long_as_its_route_says():
    memory = transport()
    hop = delay.first_hop(Moved.queue, 7)
    assert hop is not None
    await memory.publish_to_queue(hop.queue, copy(hop.headers))
    assert memory.store.take(wait_for_retries=True) is not None
    assert memory.store.clock.now == 7


async def test_a_copy_moved_to_the_dead_queue_is_parked_with_what_its_headers_say():
    memory = transport()
    headers = {
        "x-parked-reason": "failed",
        "x-attempts": 3,
        "x-exception-type": "ValueError",
        "x-exception-message": "broken",
    }
    await memory.publish_to_queue(f"{Moved.queue}.dead", copy(headers))
    [parked] = memory.store.parked[Moved]
    assert (parked.reason, parked.attempts, parked.exception_type) == ("failed", 3, "ValueError")
    assert parked.message == {"n": 1}
    assert parked.message_id == "m-1"


async def test_a_copy_moved_to_a_queue_that_does_not_exist_is_unroutable():
    with pytest.raises(Unroutable, match="no queue 'elsewhere'"):
        await transport().publish_to_queue("elsewhere", copy())


async def test_a_delivery_goes_to_its_queues_consumer_and_is_settled_once():
    memory = transport()
    seen: list[Incoming] = []
    await memory.consume(Moved.queue, 1, seen.append)
    message = memory.deliver(Moved, envelope())
    assert seen == [message]
    assert (message.message_id, message.properties.content_type) == ("m-1", "application/json")
    assert not message.processed
    assert message.ack()
    assert message.processed and not message.ack() and not message.nack()


async def test_a_requeued_delivery_goes_back_to_the_head_of_the_queues():
    memory = transport()
    memory.subscribe(Moved.queue, lambda _message: None)
    memory.store.enqueue(Moved, Envelope(b"{}", {}, "later", None, None, "moves", "job"))
    message = memory.deliver(Moved, envelope())
    assert message.nack(requeue=True)
    taken = memory.store.take(wait_for_retries=False)
    assert taken is not None and taken[1].message_id == "m-1"


async def test_a_cancelled_consumption_gets_no_more_deliveries():
    memory = transport()
    consuming = await memory.consume(Moved.queue, 1, lambda _message: None)
    await consuming.cancel()
    with pytest.raises(KeyError):
        memory.deliver(Moved, envelope())
