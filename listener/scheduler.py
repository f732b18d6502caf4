"""The scheduler: one process among all runners fires each scheduled listener's ticks.

**Election.** Every runner hosting a scheduled listener consumes its queue
`<queue>.scheduler`, a quorum queue with *single active consumer*: RabbitMQ hands its
messages to one consumer only, and to the next when that one's connection or channel goes.
The queue holds tokens; whoever receives them leads. A joining scheduler publishes a token
(a spare, which the leader acks), and the leader keeps one unacked, renewing it every few
minutes (an unacked message older than the broker's `consumer_timeout` would close its
channel). A scheduler killed with kill -9 closes its TCP connection, the broker requeues
the token to the next consumer at once, and that one leads from then on.

**Why that is safe.** The broker, not a clock or a vote among clients, decides who leads,
and at most one consumer of a single-active-consumer queue receives messages at a time.
A leader cut off without noticing (a network partition) may fire a tick its successor also
fires; both messages have the same id (`listener.schedule.tick_message_id`), so an
idempotent listener handles it once. A leader stops firing as soon as it sees its connection
drop.

**State.** The token carries the last tick fired, so a new leader knows which ticks were
missed while nobody led (`missed_ticks`: the latest fires once, or none). After each tick the
leader also publishes where it runs to `<queue>.schedule` (a queue of length one), which
`amqp-listener schedules` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aio_pika
import aio_pika.abc

from listener import _nodes
from listener import schedule as _schedule
from listener._aiormq_backend import connect_node
from listener.codec import CONTENT_TYPE

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.settings import Settings

__all__ = ["RENEW_EVERY", "Scheduler", "election_queue", "scheduled", "state_queue"]

log = logging.getLogger("listener.scheduler")

#: How often the leader swaps its token for a fresh one (well under `consumer_timeout`).
RENEW_EVERY = 300.0
#: After the first token, how long a new leader waits for the others before ticking: the
#: queue may hold a token with a later last tick than the first one delivered.
_SETTLE = 0.5
_RECONNECT_PAUSE = 1.0
_HOST = socket.gethostname()


def election_queue(cls: type[Listener]) -> str:
    return f"{cls.queue}.scheduler"


def state_queue(cls: type[Listener]) -> str:
    return f"{cls.queue}.schedule"


def scheduled(listeners: Sequence[type[Listener]]) -> list[type[Listener]]:
    """The listeners among `listeners` that declare a schedule."""
    return [cls for cls in listeners if cls.schedule is not None or cls.every is not None]


def queue_arguments(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arguments of the election queue and of the state queue."""
    kind: dict[str, Any] = {"x-queue-type": "quorum"} if settings.queue_type == "quorum" else {}
    return {**kind, "x-single-active-consumer": True}, {**kind, "x-max-length": 1}


@dataclass
class _Lead:
    """One listener's election, seen from this process."""

    cls: type[Listener]
    plan: _schedule.Schedule
    held: list[aio_pika.abc.AbstractIncomingMessage] = field(default_factory=list)
    last: dt.datetime | None = None
    task: asyncio.Task[None] | None = None


class Scheduler:
    """Joins the election of every scheduled listener and fires the ticks of those it leads."""

    def __init__(self, listeners: Sequence[type[Listener]], settings: Settings) -> None:
        self.settings = settings
        zone = _schedule.time_zone(settings.schedule_timezone)
        self.leads = [
            _Lead(cls, plan)
            for cls in scheduled(listeners)
            if (plan := _schedule.schedule_of(cls, zone)) is not None
        ]
        self.fired = 0
        self._lost = asyncio.Event()

    def __repr__(self) -> str:
        leading = sum(1 for lead in self.leads if lead.held)
        return f"<Scheduler schedules={len(self.leads)} leading={leading} fired={self.fired}>"

    async def run(self, stop: asyncio.Event) -> None:
        """Take part until `stop` is set, reconnecting whenever the connection is lost."""
        while not stop.is_set():
            try:
                await self._session(stop)
            except Exception as exc:  # lost connection, refused declare: leadership is gone
                log.warning("scheduler: %s; joining again in %.0fs", exc, _RECONNECT_PAUSE)
            for lead in self.leads:
                self._resign(lead)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _RECONNECT_PAUSE)

    async def _session(self, stop: asyncio.Event) -> None:
        name = f"amqp-listener scheduler pid={os.getpid()}"
        # On a node of the list that answers (amqps: verified), as every connection is. A
        # short heartbeat: a leader cut off is noticed, and replaced, within seconds. The
        # errors are translated: their text never holds a password.
        connection = await _nodes.aconnect(
            self.settings,
            lambda node: connect_node(self.settings, node, name, heartbeat=5),
            what="scheduler",
        )
        async with connection:
            lost = self._lost = asyncio.Event()
            connection.close_callbacks.add(lambda *_: lost.set())
            channel = await connection.channel(on_return_raises=True)
            channel.close_callbacks.add(lambda *_: lost.set())
            await channel.set_qos(prefetch_count=10)
            election, state = queue_arguments(self.settings)
            for lead in self.leads:
                queue = await channel.declare_queue(
                    election_queue(lead.cls), durable=True, arguments=election
                )
                await channel.declare_queue(state_queue(lead.cls), durable=True, arguments=state)
                await queue.consume(functools.partial(self._on_token, lead, channel=channel))
                await self._publish_token(_Publishing(channel), lead, None)
            log.info("scheduler: joined the election of %d schedule(s)", len(self.leads))
            done = asyncio.ensure_future(stop.wait())
            gone = asyncio.ensure_future(lost.wait())
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            gone.cancel()
            for lead in self.leads:
                self._resign(lead)
            if lost.is_set() and not stop.is_set():
                raise ConnectionError("the scheduler's connection was lost")

    async def _on_token(
        self,
        lead: _Lead,
        message: aio_pika.abc.AbstractIncomingMessage,
        *,
        channel: aio_pika.abc.AbstractChannel,
    ) -> None:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            last = json.loads(message.body)["last_tick"]
            if last is not None:
                tick = dt.datetime.fromisoformat(last)
                lead.last = tick if lead.last is None else max(lead.last, tick)
        lead.held.append(message)
        # One token is enough to lead: the older ones go.
        while len(lead.held) > 1:
            await lead.held.pop(0).ack()
        if lead.task is None:
            log.info("scheduler: leading %s (%s)", lead.cls.name(), lead.plan.expression)
            lead.task = asyncio.create_task(self._lead(lead, _Publishing(channel)))

    def _resign(self, lead: _Lead) -> None:
        if lead.task is not None:
            lead.task.cancel()
            lead.task = None
        lead.held.clear()  # their channel is gone or going: the broker takes them back

    async def _lead(self, lead: _Lead, channel: _Publishing) -> None:
        try:
            await self._tick(lead, channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Leading without firing would be worse than not leading: start over.
            log.error("scheduler: could not fire %s (%s)", lead.cls.name(), exc)
            self._lost.set()

    async def _tick(self, lead: _Lead, channel: _Publishing) -> None:
        await asyncio.sleep(_SETTLE)
        now = dt.datetime.now(dt.UTC)
        late = lead.plan.missed(lead.last, now, lead.cls.missed_ticks)
        if late is not None:
            await self._fire(channel, lead, late, missed=True)
        start = now if lead.last is None else max(now, lead.last)
        upcoming = lead.plan.next_after(start)
        renewed = asyncio.get_running_loop().time()
        while True:
            wait = (upcoming - dt.datetime.now(dt.UTC)).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, RENEW_EVERY))
                if asyncio.get_running_loop().time() - renewed >= RENEW_EVERY:
                    await self._publish_token(channel, lead, lead.last)
                    renewed = asyncio.get_running_loop().time()
                continue
            await self._fire(channel, lead, upcoming)
            renewed = asyncio.get_running_loop().time()
            upcoming = lead.plan.next_after(upcoming)

    async def _fire(
        self, channel: _Publishing, lead: _Lead, tick: dt.datetime, *, missed: bool = False
    ) -> None:
        cls = lead.cls
        stamp = tick.astimezone(dt.UTC).isoformat()
        try:
            body = cls.codec.encode(cls.schedule_message(tick))
        except Exception:
            # The application's own code failed: this tick is skipped, the next one tried.
            log.exception("scheduler: %s.schedule_message() failed for tick %s", cls, stamp)
        else:
            await channel.publish(
                cls.queue,
                body,
                message_id=_schedule.tick_message_id(cls, tick),
                headers={_schedule.TICK_HEADER: stamp, "x-scheduled-by": f"{_HOST} {os.getpid()}"},
            )
            self.fired += 1
            late = " (the latest missed while no scheduler ran)" if missed else ""
            log.info("scheduler: fired %s tick %s%s", cls.name(), stamp, late)
        lead.last = tick
        await self._publish_token(channel, lead, tick)
        state = {
            "listener": cls.name(),
            "expression": lead.plan.expression,
            "last_tick": stamp,
            "host": _HOST,
            "pid": os.getpid(),
            "runner_pid": os.getppid(),
        }
        await channel.publish(state_queue(cls), json.dumps(state).encode())

    async def _publish_token(
        self, channel: _Publishing, lead: _Lead, last: dt.datetime | None
    ) -> None:
        token = {"last_tick": None if last is None else last.isoformat()}
        await channel.publish(election_queue(lead.cls), json.dumps(token).encode())


class _Publishing:
    """Persistent publishes to a queue by name through the default exchange."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self.channel = channel

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        message = aio_pika.Message(
            body,
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            headers=headers,
            timestamp=dt.datetime.now(dt.UTC),
        )
        await self.channel.default_exchange.publish(message, routing_key=queue, mandatory=True)
