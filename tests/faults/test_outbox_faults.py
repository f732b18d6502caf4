"""Outbox and inbox faults on the project-owned node, PostgreSQL and SQLite.

Each outbox test commits 10,000 rows (`{"n": 0}` ... `{"n": 9999}`), runs real relay
processes (`amqp-listener relay`), injects its fault, waits until the outbox is empty, then
drains the queue and classifies like the rest of the suite (faults/harness.py): **lost**
(committed, but neither in the queue nor in the dead table) must be 0; **duplicates**
(copies beyond the first) are counted and bounded by one batch per relay crash.

The faults: the writing process killed -9 right after its last commit; the relay killed -9
mid-batch, three times; the broker killed -9 and restarted under the relay; two relays at
once. The queue is a durable quorum queue, so what the broker confirmed survives its crash.
Then the inbox: every message delivered twice to an idempotent listener whose workers are
killed -9 between commit and ack; its duplicates are side effects written twice.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from support.runner_process import EXECUTABLE, RunnerProcess, clean_env

from faults.harness import TESTS, VERDICTS, Fault, Runner, Verdict, wait_until
from faults.node import RabbitNode
from listener import database, outbox
from listener.outbox import dead_table, outbox_table
from listener.relay import BATCH_SIZE

pytestmark = pytest.mark.slow

N = 10_000
KEY = "placed"
PUBLISHED = re.compile(r"published=(\d+)")


class RelayProcess(RunnerProcess):
    role = "relay"
    shown = 3000


class Outbox:
    """One test's outbox, relays and queue: commit rows, run relays, count what arrived."""

    def __init__(self, fault: Fault, node: RabbitNode, url: str, tmp: Path) -> None:
        self.fault, self.node, self.url, self.tmp = fault, node, url, tmp
        self.exchange, self.queue = fault.exchange, fault.queue
        self.engine = database.create_engine(url)
        self.relays: list[RelayProcess] = []
        self._watch: pika.BlockingConnection | None = None
        self._watch_channel: Any = None
        with self._channel() as channel:
            channel.exchange_declare(self.exchange, "topic", durable=True)
            channel.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(self.queue, self.exchange, KEY)

    def env(self) -> dict[str, str]:
        return {
            **clean_env(TESTS),
            "AMQP_URL": self.node.url,
            "AMQP_LISTENER_DATABASE_URL": self.url,
        }

    def commit(self, count: int = N, per_transaction: int = 1000) -> None:
        for start in range(0, count, per_transaction):
            bodies = [
                json.dumps({"n": n}).encode()
                for n in range(start, min(count, start + per_transaction))
            ]
            with Session(self.engine) as session, session.begin():
                outbox.write(session, self.exchange, KEY, bodies)

    def start_relay(self) -> RelayProcess:
        index = len(self.relays)
        relay = RelayProcess(
            [EXECUTABLE, "relay"],
            self.env(),
            self.tmp / f"relay-{index}.out",
            self.tmp / f"relay-{index}.err",
        )
        self.relays.append(relay)
        relay.wait_log("outbox relay started", timeout=30)
        return relay

    def stop_relays(self) -> list[int]:
        """SIGTERM every relay still running; their exit codes."""
        running = [relay for relay in self.relays if not relay.exited]
        for relay in running:
            relay.send(signal.SIGTERM)
        return [relay.wait_exit(30) for relay in running]

    def waiting(self) -> int:
        return self._count(outbox_table)

    def dead(self) -> int:
        return self._count(dead_table)

    def _count(self, table: sa.Table) -> int:
        with self.engine.connect() as connection:
            return int(
                connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            )

    def queued(self) -> int:
        """Messages in the queue now (0 while the node does not answer), asked on a
        connection kept open, so that a fault follows the count within milliseconds."""
        try:
            if self._watch is None or self._watch.is_closed:
                params = pika.URLParameters(self.node.url)
                params.socket_timeout = 5
                self._watch = pika.BlockingConnection(params)
                self._watch_channel = self._watch.channel()
            declared = self._watch_channel.queue_declare(self.queue, passive=True)
            return int(declared.method.message_count)
        except (pika.exceptions.AMQPError, OSError):
            self._drop_watch()
            return 0

    def _drop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            with contextlib.suppress(Exception):
                watch.close()

    def drain(self) -> collections.Counter[int]:
        """Every message in the queue, taken out: how many copies of each `n`."""
        counts: collections.Counter[int] = collections.Counter()
        with self._channel() as channel:
            channel.basic_qos(prefetch_count=1000)
            for method, _properties, body in channel.consume(
                self.queue, auto_ack=True, inactivity_timeout=2
            ):
                if method is None:
                    break
                counts[json.loads(body)["n"]] += 1
            channel.cancel()
        return counts

    def verdict(
        self,
        fault: str,
        record: Callable[[str, object], None],
        *,
        recovery_s: float | None = None,
        notes: str = "",
    ) -> Verdict:
        """Drain, classify, and record like the rest of the suite (the summary table)."""
        arrived = self.drain()
        with self.engine.connect() as connection:
            dead = {
                json.loads(body)["n"]
                for body in connection.execute(sa.select(dead_table.c.body)).scalars()
            }
        lost = sorted(set(range(N)) - set(arrived) - dead)
        strangers = set(arrived) - set(range(N))
        result = Verdict(
            fault=fault,
            confirmed=N,  # committed to the outbox: what must arrive
            lost=len(lost),
            duplicates=sum(count - 1 for count in arrived.values() if count > 1),
            unknown=0,
            unknown_arrived=0,
            retried=0,
            parked=len(dead),
            bad=len(strangers),
            recovery_s=recovery_s,
            notes=notes,
            lost_ids=[str(n) for n in lost[:20]],
        )
        for name in ("confirmed", "lost", "duplicates", "parked", "bad"):
            record(name, getattr(result, name))
        record("recovery_s", recovery_s)
        print(result.line())
        VERDICTS.append(result)
        return result

    def published_by(self) -> list[int]:
        """What each relay reported publishing when it stopped (none for a killed one)."""
        return [int(n) for relay in self.relays for n in PUBLISHED.findall(relay.stderr)]

    @contextlib.contextmanager
    def _channel(self) -> Iterator[Any]:
        params = pika.URLParameters(self.node.url)
        params.socket_timeout = 5
        connection = pika.BlockingConnection(params)
        try:
            yield connection.channel()
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def close(self) -> None:
        self._drop_watch()
        for relay in self.relays:
            relay.kill()
        self.engine.dispose()


@pytest.fixture
def box(fault: Fault, node: RabbitNode, database_url: str, tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(fault, node, database_url, tmp_path)
    try:
        yield box
    finally:
        box.close()


def backend(box: Outbox) -> str:
    return kind(box.url)


def kind(url: str) -> str:
    return "postgresql" if url.startswith("postgresql") else "sqlite"


# -- the writer killed -9 right after its commit -----------------------------------------------

WRITER = """
import os, signal, sys
from sqlalchemy.orm import Session
import listener
from listener import database

engine = database.create_engine(sys.argv[1])
exchange, count = sys.argv[2], int(sys.argv[3])
for start in range(0, count, 100):
    with Session(engine) as session, session.begin():
        for n in range(start, min(count, start + 100)):
            listener.publish(exchange + ".placed", {"n": n}, session=session)
os.kill(os.getpid(), signal.SIGKILL)  # right after the last commit, nothing else done
"""


def test_a_writer_killed_right_after_its_commit_loses_nothing(box: Outbox, record_property):
    box.start_relay()  # publishing while the writer writes
    writer = subprocess.run(
        [sys.executable, "-c", WRITER, box.url, box.exchange, str(N)],
        env=box.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    killed = time.monotonic()
    assert writer.returncode == -signal.SIGKILL, writer.stderr
    wait_until(lambda: box.waiting() == 0, 120, "the outbox to empty")
    emptied = time.monotonic() - killed
    assert box.stop_relays() == [0]

    verdict = box.verdict(
        f"outbox: writer kill -9 after commit, {N} ({backend(box)})",
        record_property,
        notes=f"outbox empty {emptied:.1f}s after the writer died",
    )
    verdict.assert_nothing_lost()
    assert verdict.parked == 0
    assert verdict.duplicates == 0  # no relay crashed


# -- the relay killed -9 mid-batch -------------------------------------------------------------

CRASHES = 3


def test_a_relay_killed_mid_batch_three_times_loses_nothing(box: Outbox, record_property):
    box.commit()
    for crash in range(1, CRASHES + 1):
        relay = box.start_relay()
        # Each relay publishes a couple of batches, then dies a quarter into publishing the
        # next one: a batch published in part, confirmed in part, settled not at all.
        mark = crash * N // (CRASHES + 2) + BATCH_SIZE // 4
        wait_until(
            lambda m=mark: box.queued() >= m, 60, f"{mark} messages in the queue", step=0.002
        )
        relay.process.kill()
        relay.wait_exit(10)
        assert box.waiting() > 0, "the relay finished before its kill: nothing was tested"
    box.start_relay()
    wait_until(lambda: box.waiting() == 0, 120, "the outbox to empty")
    assert box.stop_relays() == [0]

    verdict = box.verdict(
        f"outbox: relay kill -9 mid-batch x{CRASHES}, {N} ({backend(box)})",
        record_property,
        notes=f"bound {CRASHES} x {BATCH_SIZE} duplicates",
    )
    verdict.assert_nothing_lost()
    assert verdict.parked == 0
    assert 0 < verdict.duplicates <= CRASHES * BATCH_SIZE, "no kill hit a batch on its way out"


# -- the broker killed -9 and restarted under the relay ----------------------------------------


def test_a_broker_restart_under_the_relay_only_delays_the_rows(
    box: Outbox, node: RabbitNode, record_property
):
    box.commit()
    beam = node.os_pid()
    box.start_relay()
    mark = N // 5 + BATCH_SIZE // 4  # a quarter into a batch
    wait_until(lambda: box.queued() >= mark, 60, f"{mark} messages in the queue", step=0.002)
    node.kill(beam)
    killed = time.monotonic()
    waiting_at_kill = box.waiting()
    time.sleep(1)
    node.start()
    restarted = time.monotonic()
    wait_until(lambda: box.waiting() == 0, 120, "the outbox to empty after the restart")
    back = time.monotonic() - restarted
    assert box.stop_relays() == [0]

    verdict = box.verdict(
        f"outbox: broker kill -9 + restart, {N} ({backend(box)})",
        record_property,
        recovery_s=back,
        notes=(
            f"{waiting_at_kill} rows waiting at the kill; outage {restarted - killed:.1f}s; "
            f"outbox empty {back:.1f}s after the restart"
        ),
    )
    verdict.assert_nothing_lost()
    assert waiting_at_kill > 0, "the relay finished before the broker died: nothing was tested"
    assert verdict.parked == 0
    # Only the batch in flight when the broker died, unconfirmed, is published again.
    assert verdict.duplicates <= BATCH_SIZE


# -- two relays at once ------------------------------------------------------------------------


def test_two_relays_at_once_publish_everything_once(box: Outbox, record_property):
    box.commit()
    box.start_relay()
    box.start_relay()
    wait_until(lambda: box.waiting() == 0, 120, "the outbox to empty")
    assert box.stop_relays() == [0, 0]
    shares = box.published_by()

    verdict = box.verdict(
        f"outbox: two relays at once, {N} ({backend(box)})",
        record_property,
        notes=f"published by each relay: {shares}",
    )
    verdict.assert_nothing_lost()
    assert verdict.parked == 0
    assert verdict.duplicates == 0
    assert sum(shares) == N


# -- the inbox: every message twice, workers killed -9 between commit and ack -----------------

INBOX_N = 2_000
DIE_AT = (100, 500, 900, 1300, 1700)  # each kills its worker once, after commit, before ack
INBOX_APP = "tests.apps.inbox_app"


def test_an_idempotent_listener_writes_each_effect_once_through_doubles_and_kills(
    fault: Fault, node: RabbitNode, database_url: str, tmp_path: Path, record_property
):
    from apps.inbox_app import effects
    from support.runner_process import REPO

    engine = database.create_engine(database_url)
    effects.drop(engine, checkfirst=True)
    effects.create(engine)
    env = {
        **clean_env(REPO),
        "AMQP_URL": node.url,
        "AMQP_LISTENER_CONNECT_ATTEMPTS": "10",
        "AMQP_LISTENER_DATABASE_URL": database_url,
        "APP_EXCHANGE": fault.exchange,
        "APP_QUEUE": fault.queue,
        "APP_MARKER_DIR": str(tmp_path),
    }
    runner = Runner(
        [EXECUTABLE, "run", INBOX_APP, "--workers", "2"],
        env,
        tmp_path / "inbox.out",
        tmp_path / "inbox.err",
    )
    fault.runners.append(runner)

    def rows() -> collections.Counter[int]:
        with engine.connect() as connection:
            return collections.Counter(connection.execute(sa.select(effects.c.n)).scalars())

    try:
        runner.wait_started(2, timeout=30)
        params = pika.URLParameters(node.url)
        connection = pika.BlockingConnection(params)
        channel = connection.channel()
        channel.confirm_delivery()
        for n in range(INBOX_N):
            body = json.dumps({"n": n, "die_after_commit": n in DIE_AT}).encode()
            properties = pika.BasicProperties(
                message_id=f"inbox-{fault.exchange}-{n}", delivery_mode=2
            )
            for _ in range(2):
                channel.basic_publish(fault.exchange, "effect", body, properties)
        connection.close()
        started = time.monotonic()
        wait_until(lambda: len(rows()) >= INBOX_N, 180, "every message's effect")
        # Each message's second copy, and the copy of each killed one redelivered.
        runner.wait_log("was handled before (inbox)", count=INBOX_N + len(DIE_AT), timeout=120)
        wait_until(lambda: fault.consumers() == 2, 60, "both workers consuming")
        settled = time.monotonic() - started
        runner.send(signal.SIGTERM)
        assert runner.wait_exit(60) == 0
        written = rows()
    finally:
        runner.kill()
        effects.drop(engine, checkfirst=True)
        engine.dispose()

    kills = sum(1 for n in DIE_AT if (tmp_path / f"died-{n}").exists())
    acked_unrun = runner.stderr.count("was handled before (inbox)")
    lost = sorted(set(range(INBOX_N)) - set(written))
    result = Verdict(
        fault=f"inbox: {INBOX_N} msgs x2, {kills} kill -9 after commit ({kind(database_url)})",
        confirmed=INBOX_N,
        lost=len(lost),
        duplicates=sum(count - 1 for count in written.values() if count > 1),
        unknown=0,
        unknown_arrived=0,
        retried=0,
        parked=0,
        bad=len(set(written) - set(range(INBOX_N))),
        recovery_s=None,
        notes=(
            f"duplicate side effects counted in rows; {acked_unrun} deliveries acked unrun; "
            f"all handled in {settled:.1f}s"
        ),
        lost_ids=[str(n) for n in lost[:20]],
    )
    for name in ("confirmed", "lost", "duplicates"):
        record_property(name, getattr(result, name))
    print(result.line())
    VERDICTS.append(result)
    result.assert_nothing_lost()
    assert result.duplicates == 0
    assert kills == len(DIE_AT)
    assert acked_unrun >= INBOX_N + kills
