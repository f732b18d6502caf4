"""Header values decoded from pika as they were sent, so that moved copies keep them.

pika 1.x reads AMQP field values with three flaws that matter to a runner which copies
headers into retried and parked messages (aio-pika re-encodes them):

- floats and doubles (`f`, `d`) come back truncated to integers (3.75 becomes 3);
- byte arrays (`x`), and long strings that are not UTF-8, come back as `bytes`, which
  aio-pika refuses to encode (as `bytearray` they round-trip as byte arrays);
- 64-bit integers come back as pika's own `long` type, which prints as `3L`.

`install()` wraps pika's field decoder once per process. pika looks the decoder up by name
for every value, nested arrays and tables included, so the one wrapper covers them all. It
changes nothing for values pika already decodes well, and is idempotent.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable
from typing import Any

__all__ = ["install"]

_Decoder = Callable[[bytes, int], tuple[Any, int]]

#: pika's codec module (no type stubs cover it).
_data: Any = importlib.import_module("pika.data")


def install() -> None:
    """Put the corrected decoder in place (once; later calls do nothing)."""
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
