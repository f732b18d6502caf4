"""What both sides of a ratio put on the wire, and where the broker is.

Imported by the baseline processes, so it must not import the framework: a raw aio-pika
consumer is measured (time and memory) without amqp-listener loaded.
"""

from __future__ import annotations

import os
import random
from typing import Any

__all__ = ["CONTENT_TYPE", "DEFAULT_URL", "item", "one_url", "url"]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: What the framework's publishers set; the baselines set it too.
CONTENT_TYPE = "application/json"


def item(n: int) -> dict[str, Any]:
    """Message number `n` of a measurement, as the framework's `Item` model reads it."""
    return {"n": n, "name": f"item-{n}"}


def url() -> str:
    """The broker URL: `AMQP_URL`, as the framework reads it, or the local broker."""
    return os.environ.get("AMQP_URL", DEFAULT_URL)


def one_url() -> str:
    """One broker URL for a hand-written client, which takes one: of a list (a cluster's
    nodes, comma-separated), one at random, as the framework's connections pick theirs."""
    return random.choice([one.strip() for one in url().split(",")])
