"""The messages of the fault suite: a unique id, and a padded body that proves it is whole.

`item("b1-17", size=200_000)` pads the message with `size` random characters and carries
their SHA-256, so a handler can tell a complete body from one cut or spliced on the way.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from pydantic import BaseModel

__all__ = ["Item", "intact", "item"]


class Item(BaseModel):
    id: str
    sleep: float = 0.0
    fail_first: bool = False  # raise on the first attempt: a retry through the delay queue
    poison: str = ""  # kill the worker on every attempt: exit, segv, abort or oom (faults/app.py)
    size: int = 0
    sha: str = ""
    pad: str = ""


def item(
    message_id: str,
    *,
    sleep: float = 0.0,
    size: int = 0,
    fail_first: bool = False,
    poison: str = "",
) -> dict[str, Any]:
    """A message body (as the fields `notify()` takes)."""
    pad = secrets.token_hex(size // 2 + 1)[:size] if size else ""
    return {
        "id": message_id,
        "sleep": sleep,
        "fail_first": fail_first,
        "poison": poison,
        "size": size,
        "sha": hashlib.sha256(pad.encode()).hexdigest() if size else "",
        "pad": pad,
    }


def intact(message: Item) -> bool:
    """Whether the padding is as long as announced and matches its checksum."""
    if not message.size:
        return not message.pad
    return (
        len(message.pad) == message.size
        and hashlib.sha256(message.pad.encode()).hexdigest() == message.sha
    )
