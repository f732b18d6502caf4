"""The framework's jobs written by hand: the baselines of its ratios.

Run as `python -m bench.baselines KIND ...` in a subprocess of its own, started the same way
as `amqp-listener run`, and without the framework imported:

* `consume-aio-pika`: `queue.consume(callback, no_ack=False)`, one `message.ack()` per
  message, on the default asyncio loop (`--uvloop` for the informational row);
  `--latency` reads the probe's send time from the JSON body, as a real consumer would.
* `consume-pika-select`: pika's SelectConnection, `basic_consume`, one `basic_ack` each.
* `publish-pika-serial`: BlockingConnection, `confirm_delivery()`, one confirmed publish at
  a time (what a plain synchronous publisher does).
* `publish-aio-pika-pipelined`: windows of `--window` publishes gathered, each confirmed.

Publishers send what the framework's publishers send: the same compact JSON body,
persistent, `application/json`, a message id and a timestamp, with the mandatory flag. Each
sends one untimed warm-up message first (it opens the connection), then times `--count`
messages and writes `{"messages": ..., "seconds": ...}` to `--out`. Consumers run until
SIGTERM; their numbers go through `bench.recorder`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import signal
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc

from bench.recorder import RECORDER
from bench.wire import CONTENT_TYPE, item, one_url


def _body(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _run(main: Coroutine[Any, Any, None], *, uvloop: bool) -> None:
    factory = None
    if uvloop:
        import uvloop as uvloop_module

        factory = uvloop_module.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def _write_result(out: Path, messages: int, seconds: float) -> None:
    out.write_text(json.dumps({"messages": messages, "seconds": seconds}))


# -- consumers -------------------------------------------------------------------------------


async def consume_aio_pika(queue: str, prefetch: int, *, latency: bool) -> None:
    """Consume `queue` with a callback and per-message acks until SIGTERM."""
    connection = await aio_pika.connect(one_url())
    channel = await connection.channel(publisher_confirms=False)
    await channel.set_qos(prefetch_count=prefetch)
    source = await channel.get_queue(queue, ensure=False)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        RECORDER.hit()
        await message.ack()

    async def on_probe(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        RECORDER.hit(json.loads(message.body)["t"])
        await message.ack()

    await source.consume(on_probe if latency else on_message, no_ack=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await connection.close()


def consume_pika_select(queue: str, prefetch: int) -> None:
    """Consume `queue` on pika's SelectConnection with per-message acks until SIGTERM."""
    import pika  # here, not at the top: the aio-pika consumer's memory must not include it

    def on_message(channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
        RECORDER.hit()
        channel.basic_ack(method.delivery_tag)

    def on_channel(channel: Any) -> None:
        channel.basic_qos(
            prefetch_count=prefetch,
            callback=lambda _frame: channel.basic_consume(queue, on_message),
        )

    failed: list[BaseException] = []

    def on_open_error(connection: Any, exc: BaseException) -> None:
        failed.append(exc)
        connection.ioloop.stop()

    connection = pika.SelectConnection(
        pika.URLParameters(one_url()),
        on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
        on_open_error_callback=on_open_error,
        on_close_callback=lambda conn, _exc: conn.ioloop.stop(),
    )

    def stop(_signum: int, _frame: Any) -> None:
        connection.ioloop.add_callback_threadsafe(connection.close)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    connection.ioloop.start()
    if failed:
        raise SystemExit(f"bench: pika could not connect: {failed[0]}")


# -- publishers ------------------------------------------------------------------------------


def publish_pika_serial(exchange: str, routing_key: str, count: int, out: Path) -> None:
    """Publish `count` messages one at a time, each waiting for its confirm."""
    import pika
    import pika.spec

    connection = pika.BlockingConnection(pika.URLParameters(one_url()))
    channel = connection.channel()
    channel.confirm_delivery()
    values = [item(n) for n in range(count + 1)]

    def send(value: dict[str, Any]) -> None:
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.spec.PERSISTENT_DELIVERY_MODE,
            message_id=uuid.uuid4().hex,
            timestamp=int(time.time()),
        )
        channel.basic_publish(exchange, routing_key, _body(value), properties, mandatory=True)

    send(values[0])
    start = time.monotonic()
    for value in values[1:]:
        send(value)
    seconds = time.monotonic() - start
    connection.close()
    _write_result(out, count, seconds)


async def publish_aio_pika_pipelined(
    exchange: str, routing_key: str, count: int, window: int, out: Path
) -> None:
    """Publish `count` messages in gathered windows of `window`, every one confirmed."""
    connection = await aio_pika.connect(one_url())
    channel = await connection.channel(publisher_confirms=True)
    destination = await channel.get_exchange(exchange, ensure=False)
    values = [item(n) for n in range(count + 1)]

    async def send(value: dict[str, Any]) -> None:
        message = aio_pika.Message(
            _body(value),
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
            timestamp=dt.datetime.now(dt.UTC),
        )
        await destination.publish(message, routing_key, mandatory=True)

    await send(values[0])
    start = time.monotonic()
    for first in range(1, count + 1, window):
        await asyncio.gather(*(send(value) for value in values[first : first + window]))
    seconds = time.monotonic() - start
    await connection.close()
    _write_result(out, count, seconds)


def main(argv: list[str] | None = None) -> None:
    """Run one baseline (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.baselines")
    parser.add_argument(
        "kind",
        choices=[
            "consume-aio-pika",
            "consume-pika-select",
            "publish-pika-serial",
            "publish-aio-pika-pipelined",
        ],
    )
    parser.add_argument("--queue", default="")
    parser.add_argument("--exchange", default="")
    parser.add_argument("--routing-key", default="")
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--latency", action="store_true")
    args = parser.parse_args(argv)
    if args.kind == "consume-aio-pika":
        _run(consume_aio_pika(args.queue, args.prefetch, latency=args.latency), uvloop=args.uvloop)
    elif args.kind == "consume-pika-select":
        consume_pika_select(args.queue, args.prefetch)
    elif args.kind == "publish-pika-serial":
        publish_pika_serial(args.exchange, args.routing_key, args.count, args.out)
    else:
        _run(
            publish_aio_pika_pipelined(
                args.exchange, args.routing_key, args.count, args.window, args.out
            ),
            uvloop=args.uvloop,
        )


if __name__ == "__main__":
    main()
