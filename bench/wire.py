"""What both sides of a ratio put on the wire, and where the broker is.

Imported by the baseline processes, so it must not import the framework: a raw aio-pika
consumer is measured (time and memory) without amqp-listener loaded.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CONTENT_TYPE", "DEFAULT_URL", "item", "url"]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: What the framework's publishers set; the baselines set it too.
CONTENT_TYPE = "application/json"


def item(n: int) -> dict[str, Any]:
    """Message number `n` of a measurement, as the framework's `Item` model reads it."""
    return {"n": n, "name": f"item-{n}"}


def url() -> str:
    """The broker URL: `AMQP_URL`, as the framework reads it, or the local broker."""
    return os.environ.get("AMQP_URL", DEFAULT_URL)
