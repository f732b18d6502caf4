"""`python -m bench.outbox`: the outbox's figures on PostgreSQL, against the local broker.

- **latency**: a writer commits one `publish(..., session=)` at a time at `--rate` messages a
  second; a relay (`amqp-listener relay`, its own process) publishes them; a consumer notes
  when each arrives. Commit to delivery, p50 and p99: an upper bound of commit to confirm.
- **writer cost**: one row per transaction, committed, with `session=` against a plain
  INSERT of the same row into a table of the same shape without the outbox's triggers.
- **relay throughput**: 4 x `--n` committed rows drained by one relay, against
  `notify_many()` of as many messages in the same run.

The writer cost and the throughput run `--repeats` times each, in an order that reverses
every repeat; each shows medians and the median of the per-repeat ratios (`ratios` lists
them: on a busy 2-core machine one run alone can be off by a quarter).

Each run makes its own database (dropped after) and its own `bench-` exchange and queue.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pika
import sqlalchemy as sa
from sqlalchemy.orm import Session

import listener
from listener import Listener, database, outbox, schema

ADMIN_URL = os.environ.get("POSTGRES_TEST_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
RELAY = os.path.join(os.path.dirname(sys.executable), "amqp-listener")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Consumer(threading.Thread):
    """Notes the arrival time of every message on `queue`, keyed by message id."""

    def __init__(self, queue: str, expected: int) -> None:
        super().__init__(daemon=True)
        self.queue, self.expected = queue, expected
        self.arrived: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP))
        channel = connection.channel()
        channel.basic_qos(prefetch_count=500)

        def on_message(ch: Any, method: Any, properties: Any, _body: bytes) -> None:
            self.arrived.setdefault(properties.message_id, time.time())
            ch.basic_ack(method.delivery_tag)
            if len(self.arrived) >= self.expected:
                ch.stop_consuming()

        channel.basic_consume(self.queue, on_message)
        channel.start_consuming()
        connection.close()
        self.done.set()


def latency(url: str, exchange: str, queue: str, rate: float, n: int) -> dict[str, float]:
    engine = database.create_engine(url)
    env = {**os.environ, "AMQP_URL": AMQP, "AMQP_LISTENER_DATABASE_URL": url}
    relay = subprocess.Popen([RELAY, "relay", "--log-level", "WARNING"], env=env)
    consumer = _Consumer(queue, n + 1)
    consumer.start()
    committed: dict[str, float] = {}
    try:
        with Session(engine) as session, session.begin():  # the relay is up once it arrives
            listener.publish(f"{exchange}.k", {"i": -1}, session=session)
        while not consumer.arrived:
            time.sleep(0.01)
        start = time.monotonic()
        for i in range(n):
            due = start + i / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            with Session(engine) as session, session.begin():
                message_id = listener.publish(f"{exchange}.k", {"i": i}, session=session)
            committed[message_id] = time.time()
        if not consumer.done.wait(60):
            raise RuntimeError(f"only {len(consumer.arrived)} of {n} messages arrived")
    finally:
        relay.terminate()
        relay.wait(15)
        engine.dispose()
    waits = [(consumer.arrived[m] - t) * 1000 for m, t in committed.items()]
    return {
        "rate": rate,
        "n": n,
        "p50_ms": round(statistics.median(waits), 2),
        "p99_ms": round(_percentile(waits, 0.99), 2),
        "max_ms": round(max(waits), 2),
    }


def writer_cost(url: str, exchange: str, n: int, repeats: int) -> dict[str, float]:
    """Per repeat, `n` one-row transactions of each kind, in an order that reverses every
    repeat; the medians, and the median of the per-repeat ratios."""
    engine = database.create_engine(url)
    plain = sa.Table(
        "bench_plain_outbox",
        sa.MetaData(),
        *(column._copy() for column in outbox.outbox_table.columns),  # no triggers
    )
    plain.create(engine)
    row = outbox.rows(exchange, "k", [b'{"i": 1}'], headers=None, ordering_key=None)[0]

    def timed(write: Any) -> float:
        start = time.perf_counter()
        for _ in range(n):
            with Session(engine) as session, session.begin():
                write(session)
        return (time.perf_counter() - start) / n * 1e6

    def insert(session: Session) -> None:
        session.execute(sa.insert(plain), [dict(row)])

    def publish(session: Session) -> None:
        listener.publish(f"{exchange}.k", {"i": 1}, session=session)

    plain_us: list[float] = []
    outbox_us: list[float] = []
    try:
        timed(insert)  # warm up
        timed(publish)
        for repeat in range(repeats):
            if repeat % 2:
                outbox_us.append(timed(publish))
                plain_us.append(timed(insert))
            else:
                plain_us.append(timed(insert))
                outbox_us.append(timed(publish))
    finally:
        plain.drop(engine)
        engine.dispose()
    ratios = [o / p for o, p in zip(outbox_us, plain_us, strict=True)]
    return {
        "plain_insert_us": round(statistics.median(plain_us), 1),
        "publish_session_us": round(statistics.median(outbox_us), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(ratio, 3) for ratio in ratios],
    }


def throughput(url: str, exchange: str, queue: str, n: int, repeats: int) -> dict[str, Any]:
    """Per repeat, `n` messages by `notify_many()` and `n` committed rows drained by one
    relay, in an order that reverses every repeat; medians and the median ratio."""

    class Bench(Listener):
        subscribes_to = f"{exchange}.k"

        def handle(self, message: dict[str, Any]) -> None: ...

    Bench.notify({"i": -1})  # connected before the clock starts, as the relay is
    _purge(queue)

    def direct() -> float:
        start = time.perf_counter()
        Bench.notify_many([{"i": i} for i in range(n)])
        rate = n / (time.perf_counter() - start)
        _purge(queue)
        return rate

    def relayed() -> float:
        rate = _relay_rate(url, exchange, n)
        _purge(queue)
        return rate

    directs: list[float] = []
    relays: list[float] = []
    for repeat in range(repeats):
        if repeat % 2:
            relays.append(relayed())
            directs.append(direct())
        else:
            directs.append(direct())
            relays.append(relayed())
    ratios = [r / d for r, d in zip(relays, directs, strict=True)]
    return {
        "n": n,
        "notify_many_per_s": round(statistics.median(directs)),
        "relay_per_s": round(statistics.median(relays)),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(ratio, 3) for ratio in ratios],
    }


def _relay_rate(url: str, exchange: str, n: int) -> float:
    """Commit `n` rows, start a relay, time it draining them (messages a second)."""
    engine = database.create_engine(url)
    bodies = [json.dumps({"i": i}).encode() for i in range(n)]
    with Session(engine) as session, session.begin():
        outbox.write(session, exchange, "k", bodies)
    env = {**os.environ, "AMQP_URL": AMQP, "AMQP_LISTENER_DATABASE_URL": url}
    started = time.perf_counter()
    relay = subprocess.Popen([RELAY, "relay", "--log-level", "WARNING"], env=env)
    try:
        first: float | None = None
        left_at_first = n
        while True:
            with engine.connect() as connection:
                left = connection.execute(
                    sa.select(sa.func.count()).select_from(outbox.outbox_table)
                ).scalar_one()
            now = time.perf_counter()
            if first is None and left < n:
                # The clock starts once the first batch is done: only the rows left then
                # count, so the relay's start-up is not timed and its first batch not free.
                first, left_at_first = now, left
            if left == 0:
                break
            time.sleep(0.02)  # a count of the table is not free: the relay's machine too
    finally:
        relay.terminate()
        relay.wait(15)
        engine.dispose()
    if first is None or left_at_first == 0:  # all in one batch: time the start-up too
        return n / (now - started)
    return left_at_first / (now - first)


def _purge(queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP))
    connection.channel().queue_purge(queue)
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__)
    parser.add_argument("--rate", type=float, default=500.0, help="messages a second (500)")
    parser.add_argument("--n", type=int, default=5000, help="messages per measure (5000)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="writer and throughput runs; medians (3)"
    )
    arguments = parser.parse_args()
    name = "bench-outbox-" + uuid.uuid4().hex[:8]
    db_name = "amqp_listener_bench_" + uuid.uuid4().hex[:8]
    admin = database.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{db_name}"')
    url = sa.make_url(ADMIN_URL).set(database=db_name).render_as_string(hide_password=False)
    connection_ = pika.BlockingConnection(pika.URLParameters(AMQP))
    channel = connection_.channel()
    channel.exchange_declare(name, "topic", durable=True)
    channel.queue_declare(name, durable=True)
    channel.queue_bind(name, name, "k")
    try:
        engine = database.create_engine(url)
        schema.upgrade(engine)
        engine.dispose()
        results = {
            "latency": latency(url, name, name, arguments.rate, arguments.n),
            "writer_cost": writer_cost(url, name, 2000, arguments.repeats),
            "relay_throughput": throughput(url, name, name, arguments.n * 4, arguments.repeats),
        }
        print(json.dumps(results, indent=2))
    finally:
        channel.queue_delete(name)
        channel.exchange_delete(name)
        connection_.close()
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        admin.dispose()


if __name__ == "__main__":
    main()
