"""Every use of pika's private parts, in one place, each with a reason and a fallback.

pika 1.x has no public way to do a few things the framework needs. Each function here
reaches into one private attribute, says why, and degrades to pika's own behaviour when
the attribute is gone, so that a pika upgrade slows or weakens a feature instead of
breaking it. `tests/test_pika_internals.py` checks every one of them against the installed
pika, so that such an upgrade fails a test instead of degrading silently.

Each function, the private part it reaches into, and what that buys:

- `select_connection`: `BlockingConnection._impl`, the SelectConnection underneath.
- `buffered_channel`: `BlockingChannel._impl`, the channel underneath, which buffers a
  publish or an ack instead of a write and a poll per frame (a replay's batches).
- `call_later`, `remove_timeout`: `_adapter_call_later`, `_adapter_remove_timeout`, a confirm
  deadline that fires inside a blocking publish.
- `terminate`: `_terminate_stream`, dropping a blocking connection without the handshake.
- `readable_probe`: `_transport._sock`, one poll(2) instead of an I/O loop pass per publish.
- `coalesce_frames`: `_adapter_emit_data`, `_output_marshaled_frames`, a message's three
  frames in one socket write.
- `forget_cancelling`: `Channel._cancelled`, deliveries arriving during a cancel go to the
  consumer instead of back to the queue with a requeue.
- `abort`: `_terminate_stream`, dropping an asyncio connection at once.
- `unsent_bytes`: `_transport`, whether the acks marked so far have left the process.
- `install_field_decoder`: `pika.data.decode_value`, header values decoded as they were sent.

The field decoder: pika reads AMQP field values with three flaws that matter to a runner
which copies headers into retried and parked messages (aio-pika re-encodes them): floats and
doubles come back truncated to integers (3.75 becomes 3); byte arrays, and long strings
that are not UTF-8, come back as `bytes`, which aio-pika refuses to encode (as `bytearray`
they round-trip as byte arrays); 64-bit integers come back as pika's own `long`, which
prints as `3L`. pika looks the decoder up by name for every value, nested arrays and tables
included, so one wrapper covers them all. It changes nothing for values pika already
decodes well, and is installed once per process.
"""

from __future__ import annotations

import contextlib
import importlib
import select
import struct
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions

__all__ = [
    "abort",
    "buffered_channel",
    "call_later",
    "coalesce_frames",
    "forget_cancelling",
    "install_field_decoder",
    "readable_probe",
    "remove_timeout",
    "select_connection",
    "terminate",
    "unsent_bytes",
]

_Decoder = Callable[[bytes, int], tuple[Any, int]]

#: pika's codec module (no type stubs cover it).
_data: Any = importlib.import_module("pika.data")


# -- blocking connections (notify()) ----------------------------------------------------------


def select_connection(connection: pika.BlockingConnection) -> Any:
    """The SelectConnection a BlockingConnection drives (its timers, socket and writer)."""
    return connection._impl  # type: ignore[attr-defined]


def buffered_channel(channel: Any) -> Any:
    """The asynchronous channel a BlockingChannel drives. Its `basic_publish` and
    `basic_ack` only buffer frames, which the next blocking call sends in one go; the
    blocking channel's own write and poll the socket for every frame."""
    return channel._impl


def call_later(adapter: Any, seconds: float, callback: Callable[[], None]) -> object:
    """A timer on the SelectConnection. BlockingConnection.call_later timers fire only inside
    process_data_events(), never while basic_publish() waits for its confirm; these do."""
    return adapter._adapter_call_later(seconds, callback)


def remove_timeout(adapter: Any, timer: object) -> None:
    with contextlib.suppress(Exception):
        adapter._adapter_remove_timeout(timer)


def terminate(adapter: Any, reason: str) -> None:
    """Drop the connection as a lost one (no closing handshake: the peer may not answer),
    let its I/O loop run the callbacks once, then close the loop and its wake-up sockets."""
    with contextlib.suppress(Exception):
        adapter._terminate_stream(pika.exceptions.StreamLostError(reason))
        adapter.ioloop.process_timeouts()
    with contextlib.suppress(Exception):
        adapter.ioloop.close()


def readable_probe(adapter: Any) -> Callable[[], bool] | None:
    """A check, one poll(2) call, for whether the connection's socket has anything to read;
    None without access to the socket (every publish then runs pika's I/O loop)."""
    try:
        fd = adapter._transport._sock.fileno()
    except Exception:
        return None
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return lambda: bool(poller.poll(0))


def coalesce_frames(adapter: Any) -> bool:
    """Write a message's frames (method, header, body) to the socket in one go, instead of
    three sends and three TCP segments the broker wakes up for. False (nothing changed)
    when pika lacks the writer."""
    emit = getattr(adapter, "_adapter_emit_data", None)
    if emit is None or not hasattr(adapter, "_output_marshaled_frames"):
        return False

    def output(frames: Sequence[bytes]) -> None:
        data = b"".join(frames)
        # pika's heartbeat checker reads these counters to tell an idle connection.
        adapter.bytes_sent += len(data)
        adapter.frames_sent += len(frames)
        emit(data)

    adapter._output_marshaled_frames = output
    return True


# -- asyncio connections (the runner's deliveries) ---------------------------------------------


def forget_cancelling(channel: Any, tag: str) -> bool:
    """Let deliveries still arriving for a cancelled consumer reach its callback.

    pika rejects them with requeue until Cancel-Ok, and RabbitMQ counts a requeue as a
    delivery without an outcome (`x-delivery-count`), one step towards the delivery limit
    for nothing. False when pika keeps no such set (its rejects then stand)."""
    cancelling = getattr(channel, "_cancelled", None)
    if not isinstance(cancelling, set):
        return False
    cancelling.discard(tag)
    return True


def abort(connection: Any, reason: str = "dropped: the broker stopped answering") -> None:
    """Drop the socket at once, as pika does itself when the stream breaks: the connection
    then closes with a StreamLostError and runs its close callbacks. (Disconnecting the
    stream without setting that error first leaves the connection object "open" forever.)"""
    with contextlib.suppress(Exception):
        connection._terminate_stream(pika.exceptions.StreamLostError(reason))


def unsent_bytes(connection: Any) -> int:
    """Bytes pika holds for the socket (its transport is private to the connection); 0 when
    that cannot be read."""
    transport = getattr(connection, "_transport", None)
    try:
        return int(transport.get_write_buffer_size()) if transport is not None else 0
    except Exception:
        return 0


# -- header values -------------------------------------------------------------------------


def install_field_decoder() -> None:
    """Put the corrected field decoder in place (once; later calls do nothing)."""
    current: _Decoder = _data.decode_value
    if getattr(current, "_amqp_listener", False):
        return
    _data.decode_value = _corrected(current)


def _corrected(original: _Decoder) -> _Decoder:
    def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
        kind = encoded[offset : offset + 1]
        if kind == b"f":
            return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
        if kind == b"d":
            return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
        value, end = original(encoded, offset)
        if isinstance(value, bytes):  # `x`, or an `S` that is not UTF-8
            return bytearray(value), end
        if kind in (b"l", b"L"):
            return int(value), end
        return value, end

    decode_value._amqp_listener = True  # type: ignore[attr-defined]
    return decode_value
