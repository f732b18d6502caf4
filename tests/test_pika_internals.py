"""Every private part of pika the framework reaches into (listener/_pika_internals.py) is
still there, and still does what it is used for, in the installed pika.

Each of them degrades to pika's own behaviour when it disappears, so nothing else would
fail: a pika upgrade that removes one must fail here, not slow a feature down in silence.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import pika
import pika.channel
import pika.data
import pytest
from pika.adapters.asyncio_connection import AsyncioConnection

from listener import _pika_internals


@pytest.fixture
def blocking(amqp_url: str):
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()


async def open_asyncio(amqp_url: str) -> AsyncioConnection:
    opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    connection = AsyncioConnection(
        pika.URLParameters(amqp_url),
        on_open_callback=lambda _c: opened.set_result(None),
        on_open_error_callback=lambda _c, exc: opened.set_exception(RuntimeError(str(exc))),
        custom_ioloop=asyncio.get_running_loop(),
    )
    await asyncio.wait_for(opened, 10)
    return connection


def test_a_blocking_connection_has_a_select_connection_underneath(blocking):
    adapter = _pika_internals.select_connection(blocking)
    assert isinstance(adapter, pika.SelectConnection)


def test_a_timer_on_the_select_connection_fires_inside_a_blocking_wait(blocking):
    adapter = _pika_internals.select_connection(blocking)
    fired: list[float] = []
    _pika_internals.call_later(adapter, 0.05, lambda: fired.append(time.monotonic()))
    blocking.process_data_events(time_limit=0.5)
    assert fired
    timer = _pika_internals.call_later(adapter, 0.05, lambda: fired.append(0.0))
    _pika_internals.remove_timeout(adapter, timer)
    blocking.process_data_events(time_limit=0.2)
    assert len(fired) == 1  # the removed timer never fired


def test_a_blocking_channel_has_a_buffering_channel_underneath(blocking):
    channel = blocking.channel()
    underneath = _pika_internals.buffered_channel(channel)
    assert isinstance(underneath, pika.channel.Channel)
    assert underneath.channel_number == channel.channel_number


def test_the_socket_can_be_polled_without_running_the_io_loop(blocking):
    probe = _pika_internals.readable_probe(_pika_internals.select_connection(blocking))
    assert probe is not None, "pika's socket is out of reach: every publish runs the I/O loop"
    assert probe() is False  # nothing arrived on an idle connection


def test_a_messages_frames_go_to_the_socket_in_one_write(blocking):
    adapter = _pika_internals.select_connection(blocking)
    writes: list[bytes] = []
    emit = adapter._adapter_emit_data
    adapter._adapter_emit_data = lambda data: (writes.append(data), emit(data))
    assert _pika_internals.coalesce_frames(adapter), "pika's frame writer is out of reach"
    channel = blocking.channel()
    writes.clear()
    channel.basic_publish("", "amq.no-such-queue", b"body")
    assert len(writes) == 1  # method, header and body frames joined


def test_terminating_a_blocking_connection_drops_it_without_a_handshake(blocking):
    _pika_internals.terminate(_pika_internals.select_connection(blocking), "test")
    assert not blocking.is_open


async def test_a_cancelling_consumer_tag_can_be_taken_out_of_pikas_reject_list(amqp_url, unique):
    connection = await open_asyncio(amqp_url)
    try:
        opened: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        channel = connection.channel(on_open_callback=opened.set_result)
        await opened
        assert isinstance(channel._cancelled, set), "pika no longer keeps cancelling tags"
        channel._cancelled.add("ctag")
        assert _pika_internals.forget_cancelling(channel, "ctag")
        assert "ctag" not in channel._cancelled
    finally:
        connection.close()


async def test_an_asyncio_connections_unsent_bytes_are_counted_and_it_can_be_aborted(amqp_url):
    connection = await open_asyncio(amqp_url)
    transport = connection._transport
    assert transport is not None and hasattr(transport, "get_write_buffer_size")
    assert _pika_internals.unsent_bytes(connection) == 0
    _pika_internals.abort(connection)
    for _ in range(100):
        if connection.is_closed:
            break
        await asyncio.sleep(0.02)
    assert connection.is_closed
    # The transport closes its socket a loop turn later: wait for it, so none is left open.
    for _ in range(100):
        if getattr(transport, "_sock", None) is None:
            break
        await asyncio.sleep(0.02)
    assert getattr(transport, "_sock", None) is None, "pika left the aborted socket open"


def test_the_field_decoder_is_replaced_once_and_reads_values_as_sent():
    _pika_internals.install_field_decoder()
    installed = pika.data.decode_value
    assert getattr(installed, "_amqp_listener", False), "pika no longer decodes by name"
    _pika_internals.install_field_decoder()
    assert pika.data.decode_value is installed  # idempotent
    # How RabbitMQ sends them: a double (pika itself only ever encodes decimals), a long.
    encoded = b"\x01fd" + struct.pack(">d", 3.75) + b"\x01nl" + struct.pack(">q", 2**40)
    table, _end = pika.data.decode_table(struct.pack(">I", len(encoded)) + encoded, 0)
    assert table == {"f": 3.75, "n": 2**40}
    assert type(table["n"]) is int
