"""What a listener needs on the broker, described as data (declared by the runner).

For a listener with queue `file_copier` on `case_files.copy_requested`:

* exchange `case_files`: durable, topic;
* queue `file_copier`: durable (quorum by default), bound with `copy_requested`; a message
  the broker gave up on (delivery limit) is dead-lettered to `file_copier.dead`;
* queue `file_copier.retry.5s` per distinct retry delay: messages wait there, then expire
  back into `file_copier` (one queue per delay, so no message waits behind a longer one);
* queue `file_copier.dead`: parked messages, kept until an operator replays or purges them;
* bindings into and out of the delay levels every listener shares (`amqp-listener.delay.00`
  to `.25`, for `notify(delay=...)` and `Retry(delay=...)`, see `listener.delay`): the entry
  exchange `amqp-listener.delay` to the top level, and the out exchange
  `amqp-listener.delay.out` to `file_copier`, each with `amqp-listener.to.file_copier` and
  `x.case_files.copy_requested`.

Retry and dead queues are reached through the default exchange, by queue name. Moving a
message between them is a confirmed publish followed by an ack, or, for the broker's own
dead-lettering on quorum queues, at-least-once dead-lettering: either way nothing is lost.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from listener import delay as _delay

__all__ = [
    "DELAY_LADDER",
    "DELIVERY_LIMIT",
    "MAX_DELAY",
    "PEEK_LIMIT",
    "Binding",
    "QueueSpec",
    "QueueType",
    "Topology",
    "dead_queue_name",
    "default_queue_name",
    "delay_bindings",
    "delay_queue",
    "delay_queue_name",
    "describe",
    "is_declared_delay",
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
class Binding:
    """A binding from exchange `source` to a queue, or to an exchange when `to_exchange`."""

    source: str
    destination: str
    key: str
    to_exchange: bool = False


@dataclass(frozen=True, slots=True)
class Topology:
    """Everything one listener declares."""

    exchange: str
    binding_key: str
    queue: QueueSpec
    dead: QueueSpec
    delays: tuple[QueueSpec, ...]
    #: The delay levels every listener shares, lowest first (each has an exchange of the
    #: same name), then the queue of delayed messages whose listener is gone.
    levels: tuple[QueueSpec, ...] = ()
    #: The bindings between the shared levels.
    level_bindings: tuple[Binding, ...] = ()
    #: This listener's own bindings into and out of the shared levels.
    delay_bindings: tuple[Binding, ...] = ()

    @property
    def queues(self) -> tuple[QueueSpec, ...]:
        """The listener's own queues, in declaration order: the dead queue first, so
        dead-lettering always has a target. The shared delay levels are not among them."""
        return (self.dead, *self.delays, self.queue)

    @property
    def exchanges(self) -> tuple[str, ...]:
        """The shared delay exchanges (topic, but `delay.UNROUTED`: fanout)."""
        if not self.levels:
            return ()
        return (
            _delay.ENTRY_EXCHANGE,
            *(_delay.level_name(level) for level in range(_delay.LEVELS)),
            _delay.OUT_EXCHANGE,
        )


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
#: Where earlier versions kept a `Retry(delay=...)` outside `retry_delays` (rounded up to one
#: of these). Exact delays go through the delay levels now; `status` still counts what may
#: wait in these queues from before an upgrade.
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


def is_declared_delay(delay: float, declared: Iterable[float]) -> bool:
    """Whether `delay` has a queue of its own among `retry_delays`."""
    wanted = _milliseconds(delay)
    return any(_milliseconds(d) == wanted for d in declared)


def delay_levels() -> tuple[tuple[QueueSpec, ...], tuple[Binding, ...]]:
    """The delay levels every listener shares (lowest first, then the queue of messages no
    listener is left for) and the bindings that route between them (see `listener.delay`).

    Quorum queues whatever a listener's `queue_type`: shared, they must be declared alike by
    every runner, and only quorum queues dead-letter at least once."""
    queue_type: QueueType = "quorum"
    levels: list[QueueSpec] = []
    bindings: list[Binding] = []
    for level in range(_delay.LEVELS):
        name = _delay.level_name(level)
        below = _delay.level_name(level - 1) if level else _delay.OUT_EXCHANGE
        arguments: dict[str, Any] = {
            **_type_arguments(queue_type),
            "x-message-ttl": round(_delay.STEP * 1000) * 2**level,
            "x-dead-letter-exchange": below,
            **_safe_dead_lettering(queue_type),
        }
        levels.append(QueueSpec(name, arguments))
        bindings.append(Binding(name, name, _delay.bits_pattern(level, "1")))
        bindings.append(Binding(name, below, _delay.bits_pattern(level, "0"), to_exchange=True))
    unrouted = QueueSpec(_delay.UNROUTED, _type_arguments(queue_type))
    bindings.append(Binding(_delay.UNROUTED, _delay.UNROUTED, ""))
    return (*levels, unrouted), tuple(bindings)


def delay_bindings(queue: str, *, exchange: str, binding_key: str) -> tuple[Binding, ...]:
    """One listener's way in and out of the shared delay levels: the entry exchange lets
    its keys into the top level, and the out exchange delivers them to its queue."""
    keys = (_delay.target_key(queue), _delay.address_key(exchange, binding_key))
    top = _delay.level_name(_delay.LEVELS - 1)
    return (
        *(Binding(_delay.ENTRY_EXCHANGE, top, key, to_exchange=True) for key in keys),
        *(Binding(_delay.OUT_EXCHANGE, queue, key) for key in keys),
    )


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
    levels, level_bindings = delay_levels()
    return Topology(
        exchange=exchange,
        binding_key=binding_key,
        queue=QueueSpec(queue, main_arguments),
        dead=QueueSpec(dead_queue_name(queue), _dead_arguments(queue_type)),
        delays=tuple(delay_queue(queue, ms / 1000, queue_type) for ms in delays),
        levels=levels,
        level_bindings=level_bindings,
        delay_bindings=delay_bindings(queue, exchange=exchange, binding_key=binding_key),
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
