"""Operator commands on dead-letter queues of thousands: listings page through the queue
with bounded memory, replays move each message once, and failures lose nothing.
(The full-size figures, 100,000 messages, come from `python -m bench.dead_letters`.)"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest

import listener
from listener._replay import Replaying
from listener.operations import OperationFailed, Operator

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("amqp-listener"))


def park(
    rabbit, unique: str, count: int, *, body: bytes = b"{}", shuffle: bool = True
) -> list[str]:
    """Park `count` messages in `<unique>.big.dead` (the listener queue `<unique>.big`
    exists too), their parking times in a shuffled order; returns the ids oldest first."""
    queue, dead = f"{unique}.big", f"{unique}.big.dead"
    rabbit.declare_queue(queue, **{"x-queue-type": "quorum"})
    rabbit.declare_queue(dead, **{"x-queue-type": "quorum", "x-delivery-limit": 2**31 - 1})
    order = list(range(count))
    if shuffle:
        random.Random(7).shuffle(order)
    channel = rabbit.connection.channel()
    # Confirmed: a message sent to a quorum queue whose leader is still starting, on a
    # channel closed at once, may never be enqueued.
    channel.confirm_delivery()
    for n in order:
        headers = {
            "x-parked-reason": "failed",
            "x-exception-type": "TimeoutError",
            "x-last-failure-at": f"2026-01-01T00:00:{n // 1000:02d}.{n % 1000:03d}+00:00",
        }
        channel.basic_publish(
            "",
            dead,
            body,
            pika.BasicProperties(message_id=f"m{n:05d}", delivery_mode=2, headers=headers),
        )
    channel.close()
    deadline = time.monotonic() + 30
    while rabbit.count(dead) < count:
        assert time.monotonic() < deadline, f"{dead} never held {count} messages"
        time.sleep(0.05)
    return [f"m{n:05d}" for n in range(count)]


@pytest.fixture
def operator(settings):
    with Operator(settings) as op:
        yield op


def test_a_listing_pages_through_the_queue_oldest_first(unique, rabbit, operator):
    ids = park(rabbit, unique, 1200)
    target = operator.target(f"{unique}.big")

    first = operator.page(target, limit=500)
    second = operator.page(target, limit=500, after=first.next_after)
    last = operator.page(target, limit=500, after=second.next_after)

    assert [p.message_id for p in first.messages + second.messages + last.messages] == ids
    assert (first.total, first.next_after) == (1200, ids[499])
    assert last.next_after is None and len(last.messages) == 200
    assert all(p.body == b"" for p in first.messages)  # a listing holds no bodies
    assert rabbit.count(f"{unique}.big.dead") == 1200  # and removes nothing


def test_a_page_after_an_id_that_is_gone_is_an_error_that_says_so(unique, rabbit, operator):
    park(rabbit, unique, 3)
    target = operator.target(f"{unique}.big")

    with pytest.raises(OperationFailed, match="no parked message with id 'replayed-meanwhile'"):
        operator.page(target, limit=2, after="replayed-meanwhile")


def test_the_cli_pages_with_limit_and_after(unique, rabbit, amqp_url):
    ids = park(rabbit, unique, 30)
    env = {**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}

    def listing(*extra: str) -> dict:
        result = subprocess.run(
            [CLI, "dead", "list", f"{unique}.big", "--json", *extra],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    page = listing("--limit", "20")
    rest = listing("--limit", "20", "--after", page["next_after"])

    assert [m["id"] for m in page["messages"]] == ids[:20]
    assert [m["id"] for m in rest["messages"]] == ids[20:]
    assert (page["total"], rest["next_after"]) == (30, None)


def test_listing_a_queue_of_large_bodies_keeps_memory_to_the_page(unique, rabbit, amqp_url):
    # 96 MiB parked; the listing adds far less than that to the command's own footprint
    # (its imports, measured on a queue of one message in the same environment); the old
    # listing held every body.
    park(rabbit, f"{unique}small", 1, body=b"x", shuffle=False)
    park(rabbit, unique, 3000, body=b"x" * 32 * 1024, shuffle=False)
    env = {**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}

    def peak_mib(queue: str, total: int) -> float:
        process = subprocess.Popen(
            [CLI, "dead", "list", queue, "--json", "--limit", "10"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        with process.stdout as stdout:
            out = stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        assert process.returncode == 0
        assert json.loads(out)["total"] == total
        return usage.ru_maxrss / 1024

    footprint = peak_mib(f"{unique}small.big", 1)
    listing = peak_mib(f"{unique}.big", 3000)
    assert listing - footprint < 40, f"peak RSS {listing:.0f} MiB, {footprint:.0f} MiB without"


def test_a_replay_of_thousands_moves_each_message_once(unique, rabbit, operator):
    ids = park(rabbit, unique, 3000)

    result = operator.replay(operator.target(f"{unique}.big"))

    assert result.done == ids  # reported oldest first
    moved = [properties.message_id for properties, _ in rabbit.drain(f"{unique}.big")]
    assert sorted(moved) == ids
    assert rabbit.count(f"{unique}.big.dead") == 0


def test_a_limited_replay_takes_the_oldest(unique, rabbit, operator):
    ids = park(rabbit, unique, 300)

    result = operator.replay(operator.target(f"{unique}.big"), limit=120)

    assert result.done == ids[:120]
    left = operator.page(operator.target(f"{unique}.big"), limit=500).messages
    assert [p.message_id for p in left] == ids[120:]


def test_copies_returned_unroutable_at_commit_are_parked_again(unique, rabbit, operator):
    # The listener's queue vanishes after the replay checked it: the broker returns the
    # copies only when the transaction (with the acks) commits.
    ids = park(rabbit, unique, 150)
    done: dict = {}

    with (
        pytest.raises(listener.Unroutable, match="parked again"),
        operator._peeking(f"{unique}.big.dead", transactional=True) as peek,
    ):
        Replaying(operator._connection, peek, f"{unique}.vanished", done).run(None)

    assert done == {}
    left = operator.page(operator.target(f"{unique}.big"), limit=500).messages
    assert sorted(p.message_id for p in left) == ids
