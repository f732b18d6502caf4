"""What a listener needs on the broker, described as data (declared by the runner).

For a listener with queue `file_copier` on `case_files.copy_requested`:

* exchange `case_files`: durable, topic;
* queue `file_copier`: durable (quorum by default), bound with `copy_requested`; a message
  the broker gave up on (delivery limit) is dead-lettered to `file_copier.dead`;
* queue `file_copier.retry.5s` per distinct retry delay: messages wait there, then expire
  back into `file_copier` (one queue per delay, so no message waits behind a longer one);
* queue `file_copier.dead`: parked messages, kept until an operator replays or purges them.

Retry and dead queues are reached through the default exchange, by queue name. Moving a
message between them is a confirmed publish followed by an ack, or, for the broker's own
dead-lettering on quorum queues, at-least-once dead-lettering: either way nothing is lost.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DELAY_LADDER",
    "DELIVERY_LIMIT",
    "MAX_DELAY",
    "PEEK_LIMIT",
    "QueueSpec",
    "QueueType",
    "Topology",
    "dead_queue_name",
    "default_queue_name",
    "delay_queue",
    "delay_queue_name",
    "delay_tier",
    "describe",
    "snake_case",
]

QueueType = Literal["quorum", "classic"]

#: The broker-side backstop on quorum queues: a copy delivered this many times without an
#: outcome is dead-lettered by RabbitMQ itself. The worker parks such messages earlier, after
#: `max_attempts`, with headers saying so. It is a constant, not `max_attempts`, because queue
#: arguments cannot change once declared: editing `max_attempts` must not break a deploy.
DELIVERY_LIMIT = 20


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A durable queue and the arguments it is declared with."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Topology:
    """Everything one listener declares."""

    exchange: str
    binding_key: str
    queue: QueueSpec
    dead: QueueSpec
    delays: tuple[QueueSpec, ...]

    @property
    def queues(self) -> tuple[QueueSpec, ...]:
        """All queues, in declaration order: the dead queue first, so dead-lettering always
        has a target."""
        return (self.dead, *self.delays, self.queue)


def snake_case(name: str) -> str:
    """`FileCopier` -> `file_copier`, `HTTPCallback` -> `http_callback`."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return name.lower()


def default_queue_name(class_name: str, prefix: str = "") -> str:
    """The queue a listener class owns unless it sets `queue`: `[prefix.]snake_case_name`."""
    base = snake_case(class_name)
    return f"{prefix}.{base}" if prefix else base


def dead_queue_name(queue: str) -> str:
    """Where `queue`'s parked messages wait."""
    return f"{queue}.dead"


def delay_queue_name(queue: str, delay: float) -> str:
    """`file_copier.retry.5s`, `file_copier.retry.1500ms`."""
    ms = _milliseconds(delay)
    suffix = f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"
    return f"{queue}.retry.{suffix}"


def delay_queue(queue: str, delay: float, queue_type: QueueType) -> QueueSpec:
    """The queue where a message waits `delay` seconds before going back to `queue`."""
    arguments: dict[str, Any] = {
        **_type_arguments(queue_type),
        "x-message-ttl": _milliseconds(delay),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        **_safe_dead_lettering(queue_type),
    }
    return QueueSpec(delay_queue_name(queue, delay), arguments)


#: The delivery limit of `<queue>.dead`: it only keeps peeked messages in their place (see
#: `_dead_arguments`); no operator peeks two billion times.
PEEK_LIMIT = 2**31 - 1

#: The longest delay RabbitMQ can hold a message for: x-message-ttl is a 32-bit count of ms.
MAX_DELAY = (2**32 - 1) / 1000
#: Delays outside a listener's `retry_delays` (from `Retry(delay=...)`) are rounded *up* to
#: one of these, so that jittered or computed delays cannot create a queue per millisecond.
DELAY_LADDER = (
    0.1,
    0.2,
    0.5,
    1,
    2,
    5,
    10,
    15,
    30,
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    14400,
    21600,
    43200,
    86400,
)


def delay_tier(delay: float, declared: Iterable[float]) -> float:
    """The delay queue's delay for a requested `delay`: the same if declared, else the next
    step up the ladder (never shorter than asked)."""
    wanted = _milliseconds(delay)
    if any(_milliseconds(d) == wanted for d in declared):
        return wanted / 1000
    for step in DELAY_LADDER:
        if step * 1000 >= wanted:
            return float(step)
    days = -(-wanted // 86_400_000)
    return min(days * 86_400.0, MAX_DELAY)


def describe(
    *,
    exchange: str,
    binding_key: str,
    queue: str,
    retry_delays: Iterable[float],
    queue_type: QueueType = "quorum",
) -> Topology:
    """The topology of one listener (pure: nothing is declared here)."""
    main_arguments: dict[str, Any] = {
        **_type_arguments(queue_type),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_queue_name(queue),
        **_safe_dead_lettering(queue_type),
    }
    if queue_type == "quorum":
        main_arguments["x-delivery-limit"] = DELIVERY_LIMIT
    delays = sorted({_milliseconds(d) for d in retry_delays if _milliseconds(d) > 0})
    return Topology(
        exchange=exchange,
        binding_key=binding_key,
        queue=QueueSpec(queue, main_arguments),
        dead=QueueSpec(dead_queue_name(queue), _dead_arguments(queue_type)),
        delays=tuple(delay_queue(queue, ms / 1000, queue_type) for ms in delays),
    )


def _milliseconds(delay: float) -> int:
    return max(0, round(delay * 1000))


def _type_arguments(queue_type: QueueType) -> dict[str, Any]:
    # Classic is the broker's default; naming it explicitly would make an existing queue
    # declared without the argument look inequivalent.
    return {"x-queue-type": "quorum"} if queue_type == "quorum" else {}


def _dead_arguments(queue_type: QueueType) -> dict[str, Any]:
    # A quorum queue without a delivery limit puts a message that is handed back (as
    # `amqp-listener dead list` does after peeking) at the *back*; with one, near the head,
    # where it was. The limit is out of reach, so nothing is ever dropped for it.
    if queue_type != "quorum":
        return {}
    return {**_type_arguments(queue_type), "x-delivery-limit": PEEK_LIMIT}


def _safe_dead_lettering(queue_type: QueueType) -> dict[str, Any]:
    # At-least-once dead-lettering exists for quorum queues only (3.10+), and only together
    # with overflow=reject-publish; classic queues dead-letter at most once.
    if queue_type != "quorum":
        return {}
    return {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
