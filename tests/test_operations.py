"""The operator's view: status, and parked messages listed, shown, replayed and purged,
against the real broker, through the library and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest
from pydantic import BaseModel

import listener
from listener import Listener, delay
from listener.operations import OperationFailed, Operator

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("amqp-listener"))


class Job(BaseModel):
    n: int
    mode: str = "ok"


def cli(*args: str, url: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMQP_LISTENER_")}
    env.update(AMQP_URL=url, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        input=stdin,
        check=False,
    )


def make_listener(unique: str, *, healed: list[bool]) -> type[Listener]:
    class Flaky(Listener):
        subscribes_to = f"{unique}.job"
        queue = f"{unique}.flaky"
        max_attempts = 2
        retry_delays = (0.1,)
        timeout = 0.5

        async def handle(self, message: Job) -> None:
            if healed[0]:
                return
            if message.mode == "raise":
                raise FileNotFoundError(f"no such file: case {message.n}")
            if message.mode == "reject":
                raise listener.Reject("bad request")
            if message.mode == "hang":
                await asyncio.sleep(5)

    return Flaky


async def park_one_of_each(unique, rabbit, run_worker, healed) -> tuple[type[Listener], list[str]]:
    """Park five messages, one per reason, oldest first; returns their ids in that order."""
    cls = make_listener(unique, healed=healed)
    dead = f"{cls.queue}.dead"
    ids: list[str] = []
    async with run_worker(cls):
        for n, mode in enumerate(("raise", "reject", "hang"), start=1):
            ids.append(await cls.anotify(n=n, mode=mode))
            await _wait_depth(rabbit, dead, len(ids))
        # Foreign publishers: bad JSON and a body that fails the model.
        for n, body in ((4, b'{"n": '), (5, b'{"n": "four"}')):
            rabbit.publish(
                unique, "job", body, message_id=f"foreign-{n}", content_type="application/json"
            )
            ids.append(f"foreign-{n}")
            await _wait_depth(rabbit, dead, len(ids))
    return cls, ids


async def _wait_depth(rabbit, queue: str, depth: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if rabbit.count(queue) >= depth:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{queue} did not reach {depth} message(s)")
        await asyncio.sleep(0.05)


@pytest.fixture
def operator(settings):
    with Operator(settings) as op:
        yield op


async def test_parked_messages_are_listed_oldest_first_with_reason_and_exception(
    unique, rabbit, run_worker, operator
):
    cls, ids = await park_one_of_each(unique, rabbit, run_worker, healed=[False])
    parked = operator.parked(operator.target(cls.queue))

    assert [p.message_id for p in parked] == ids
    assert [p.reason for p in parked] == [
        "failed",
        "rejected",
        "timeout",
        "decode_error",
        "validation_error",
    ]
    assert parked[0].exception_type == "FileNotFoundError"
    assert parked[0].exception_message == "no such file: case 1"
    assert parked[0].attempts == 2
    assert parked[1].exception_message == "bad request"
    assert parked[3].attempts == 1
    assert all(p.listener == cls.name() for p in parked)


async def test_peeking_twice_neither_removes_nor_reorders(unique, rabbit, run_worker, operator):
    cls, ids = await park_one_of_each(unique, rabbit, run_worker, healed=[False])
    target = operator.target(cls.queue)
    first = [p.message_id for p in operator.parked(target)]
    second = [p.message_id for p in operator.parked(target)]

    assert first == second == ids
    # The queue itself is in the same order: read it raw.
    raw = [properties.message_id for properties, _ in rabbit.drain(f"{cls.queue}.dead")]
    assert raw == ids


async def test_filters_select_by_id_exception_and_age(unique, rabbit, run_worker, operator):
    cls, ids = await park_one_of_each(unique, rabbit, run_worker, healed=[False])
    target = operator.target(cls.queue)
    import datetime as dt

    assert [p.message_id for p in operator.parked(target, ids=[ids[2]])] == [ids[2]]
    assert [p.message_id for p in operator.parked(target, exception="FileNotFound")] == [ids[0]]
    assert operator.parked(target, older_than=dt.timedelta(hours=1)) == []
    assert len(operator.parked(target)) == 5


async def test_replaying_sends_fresh_copies_back_and_removes_only_those(
    unique, rabbit, run_worker, operator
):
    cls, ids = await park_one_of_each(unique, rabbit, run_worker, healed=[False])
    target = operator.target(cls.queue)

    result = operator.replay(target, ids=[ids[0], ids[2], "no-such-id"])

    assert result.done == [ids[0], ids[2]]
    assert result.not_found == ["no-such-id"]
    copies = rabbit.drain(cls.queue)
    assert sorted(p.message_id for p, _ in copies) == sorted([ids[0], ids[2]])
    for properties, body in copies:
        headers = properties.headers or {}
        assert headers["x-replays"] == 1
        assert "x-attempts" not in headers and "x-parked-reason" not in headers
        assert headers["x-original-exchange"] == unique
        assert json.loads(body)["n"] in (1, 3)
    left = [p.message_id for p in operator.parked(target)]
    assert left == [ids[1], ids[3], ids[4]]


async def test_replayed_messages_of_every_reason_are_handled_once_the_cause_is_fixed(
    unique, rabbit, run_worker, operator
):
    healed = [False]
    cls, ids = await park_one_of_each(unique, rabbit, run_worker, healed=healed)
    healed[0] = True
    seen = []

    async with run_worker(cls) as worker:
        result = operator.replay(operator.target(cls.queue))
        assert result.done == ids
        deadline = time.monotonic() + 15
        while sum(c.counts["handled"] + c.counts["parked"] for c in worker.consumers) < 5:
            assert time.monotonic() < deadline, "replayed messages were not all handled"
            await asyncio.sleep(0.05)
        seen = [c.counts for c in worker.consumers]

    # The three that failed in the handler now succeed; the two undecodable ones are parked
    # again at once (their bodies are still bad), with their replay counted.
    assert seen[0]["handled"] == 3
    again = operator.parked(operator.target(cls.queue))
    assert sorted(p.message_id for p in again) == ["foreign-4", "foreign-5"]
    assert all(p.replays == 1 for p in again)


async def test_a_replay_that_fails_half_way_loses_nothing(unique, rabbit, run_worker, operator):
    cls, ids = await park_one_of_each(unique, rabbit, run_worker, healed=[False])
    target = operator.target(cls.queue)
    # Take the listener's queue away: the first replay is returned unroutable.
    rabbit.delete_queue(cls.queue)

    with pytest.raises(listener.Unroutable):
        operator.replay(target)

    assert [p.message_id for p in operator.parked(target)] == ids


async def test_purging_by_id_removes_only_those(unique, rabbit, run_worker, operator):
    cls, ids = await park_one_of_each(unique, rabbit, run_worker, healed=[False])
    target = operator.target(cls.queue)

    result = operator.purge(target, ids=[ids[1], ids[3]])

    assert result.done == [ids[1], ids[3]]
    assert [p.message_id for p in operator.parked(target)] == [ids[0], ids[2], ids[4]]
    assert operator.purge(target).done == [ids[0], ids[2], ids[4]]
    assert operator.parked(target) == []


def test_an_unknown_target_is_a_usage_error_and_creates_nothing(unique, rabbit, amqp_url):
    result = cli("dead", "list", f"{unique}.nothing", url=amqp_url)

    assert result.returncode == 2
    assert "no dead-letter queue" in result.stderr
    assert not rabbit.exists(f"{unique}.nothing.dead")
    assert not rabbit.exists(f"{unique}.nothing")


async def test_the_cli_lists_shows_replays_and_purges_with_json(
    unique, rabbit, run_worker, amqp_url
):
    cls, ids = await park_one_of_each(unique, rabbit, run_worker, healed=[False])
    target = cls.queue

    listed = cli("dead", "list", target, "--json", url=amqp_url)
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert [m["id"] for m in document["messages"]] == ids
    assert document["messages"][0]["exception"] == "FileNotFoundError"

    shown = cli("dead", "show", target, ids[0], "--json", url=amqp_url)
    assert shown.returncode == 0, shown.stderr
    one = json.loads(shown.stdout)
    assert json.loads(one["body"]) == {"n": 1, "mode": "raise"}
    assert "FileNotFoundError" in one["headers"]["x-exception-traceback"]

    table = cli("dead", "show", target, ids[3], url=amqp_url)
    assert table.returncode == 0 and '{"n": ' in table.stdout and "decode_error" in table.stdout

    missing = cli("dead", "show", target, "nope", url=amqp_url)
    assert missing.returncode == 1

    refused = cli("dead", "purge", target, url=amqp_url, stdin="")
    assert refused.returncode == 2
    assert rabbit.count(f"{cls.queue}.dead") == 5

    replayed = cli("dead", "replay", target, "--limit", "2", "--json", url=amqp_url)
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["replayed"] == ids[:2]

    purged = cli("dead", "purge", target, "--yes", "--json", url=amqp_url)
    assert json.loads(purged.stdout)["purged"] == ids[2:]


async def test_status_counts_ready_waiting_and_parked(
    unique, rabbit, run_worker, amqp_url, tmp_path
):
    cls, _ids = await park_one_of_each(unique, rabbit, run_worker, healed=[False])
    module = tmp_path / f"{unique}_app.py"
    module.write_text(
        "from listener import Listener\n"
        "class Flaky(Listener):\n"
        f"    subscribes_to = '{unique}.job'\n"
        f"    queue = '{cls.queue}'\n"
        "    retry_delays = (0.1,)\n"
        "    def handle(self, message): ...\n"
    )
    rabbit.publish(unique, "job", b'{"n": 9}', content_type="application/json")
    rabbit.publish("", f"{cls.queue}.retry.100ms", b'{"n": 10}')

    env_path = f"{tmp_path}{os.pathsep}{ROOT}"
    result = await asyncio.to_thread(
        subprocess.run,
        [CLI, "status", f"{unique}_app", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": env_path},
        check=False,
    )

    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["listeners"]
    assert row["queue"] == cls.queue
    assert row["parked"] == 5
    assert row["ready"] >= 1
    assert row["consumers"] == 0


def test_a_killed_listing_leaves_every_parked_message_in_place(unique, rabbit, amqp_url):
    dead = f"{unique}.bulk.dead"
    rabbit.declare_queue(dead, **{"x-queue-type": "quorum", "x-delivery-limit": 2**31 - 1})
    channel = rabbit._ch()
    channel.confirm_delivery()
    for n in range(3000):
        channel.basic_publish(
            "", dead, b"{}", pika.BasicProperties(message_id=f"m{n:04d}", delivery_mode=2)
        )

    env = {**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [CLI, "dead", "list", f"{unique}.bulk", "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    time.sleep(0.8)  # long enough to be reading, too short to finish 3000 peeks
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)

    # The broker takes back what the killed command held: every message is there, once.
    # (Their order may rotate: a killed peek returns its part of the queue at the head.)
    deadline = time.monotonic() + 10
    while rabbit.count(dead) < 3000 and time.monotonic() < deadline:
        time.sleep(0.05)
    ids = [properties.message_id for properties, _ in rabbit.drain(dead)]
    assert sorted(ids) == [f"m{n:04d}" for n in range(3000)]


@pytest.fixture
def management_plugin(amqp_url):
    """The shared broker with its management plugin on; put back as it was afterwards."""
    listed = subprocess.run(
        ["rabbitmq-plugins", "list", "-e", "-m", "rabbitmq_management"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if listed.returncode != 0:
        pytest.skip(f"rabbitmq-plugins is not usable here: {listed.stderr.strip()[:200]}")
    was_enabled = "rabbitmq_management" in listed.stdout.split()
    if not was_enabled:
        subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_management"],
            capture_output=True,
            timeout=120,
            check=True,
        )
    try:
        yield
    finally:
        if not was_enabled:
            subprocess.run(
                ["rabbitmq-plugins", "disable", "rabbitmq_management"],
                capture_output=True,
                timeout=120,
                check=False,
            )


@pytest.mark.slow
def test_status_reads_unacked_counts_from_the_management_api_when_it_answers(
    unique, rabbit, settings, management_plugin
):
    class Busy(Listener):
        subscribes_to = f"{unique}.job"
        queue = f"{unique}.busy"

        def handle(self, message) -> None: ...

    rabbit.track(Busy)
    rabbit.declare_exchange(unique)
    rabbit.declare_queue(Busy.queue, bind=(unique, "job"), **{"x-queue-type": "quorum"})
    rabbit.declare_queue(f"{Busy.queue}.dead", **{"x-queue-type": "quorum"})
    for n in range(5):
        rabbit.publish(unique, "job", json.dumps({"n": n}).encode())
    holder = pika.BlockingConnection(pika.URLParameters(settings.url.get_secret_value()))
    try:
        channel = holder.channel()
        channel.basic_qos(prefetch_count=3)
        channel.basic_consume(Busy.queue, lambda *_: None)  # takes 3, never acks
        deadline = time.monotonic() + 30
        while True:
            holder.process_data_events(time_limit=0.2)
            with Operator(settings) as operator:
                (row,) = operator.status([Busy])
            if row.unacked == 3 or time.monotonic() > deadline:
                break
    finally:
        holder.close()

    assert row.source == "management"
    assert (row.ready, row.unacked, row.consumers) == (2, 3, 1)
    # Without modules, status finds the listener queues itself (those with a .dead beside).
    with Operator(settings) as operator:
        found = {r.queue: r for r in operator.status()}
    assert Busy.queue in found and f"{Busy.queue}.dead" not in found
    assert found[Busy.queue].parked == 0


def test_status_without_modules_or_management_api_asks_for_the_modules(amqp_url, settings):
    from listener.management import ManagementAPI

    if ManagementAPI.probe(settings) is not None:
        pytest.skip("the management API answers on this broker")
    result = cli("status", url=amqp_url)
    assert result.returncode == 2
    assert "name the modules" in result.stderr


def test_a_killed_replay_leaves_every_message_parked_or_replayed(unique, rabbit, amqp_url):
    queue, dead = f"{unique}.bulk", f"{unique}.bulk.dead"
    rabbit.declare_queue(queue, **{"x-queue-type": "quorum"})
    rabbit.declare_queue(dead, **{"x-queue-type": "quorum", "x-delivery-limit": 2**31 - 1})
    channel = rabbit._ch()
    channel.confirm_delivery()
    expected = {f"m{n:04d}" for n in range(1500)}
    for message_id in sorted(expected):
        channel.basic_publish(
            "", dead, b"{}", pika.BasicProperties(message_id=message_id, delivery_mode=2)
        )

    env = {**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [CLI, "dead", "replay", queue],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    # Kill it once it has replayed some but not all (it takes the whole queue first).
    deadline = time.monotonic() + 20
    while rabbit.count(queue) < 50:
        assert time.monotonic() < deadline, "the replay never started"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)

    deadline = time.monotonic() + 10
    while rabbit.count(queue) + rabbit.count(dead) < 1500 and time.monotonic() < deadline:
        time.sleep(0.05)
    replayed = [p.message_id for p, _ in rabbit.drain(queue)]
    parked = [p.message_id for p, _ in rabbit.drain(dead)]
    assert 50 <= len(replayed) < 1500, "the kill did not land half-way"
    assert set(replayed) | set(parked) == expected  # lost: none
    # A message is removed from the dead queue only after its replay was confirmed, so at
    # most the one in hand at the kill is in both.
    assert len(set(replayed) & set(parked)) <= 1
    assert len(replayed) == len(set(replayed)) and len(parked) == len(set(parked))


def test_declare_and_publish_speak_json_too(unique, rabbit, amqp_url, tmp_path):
    module = tmp_path / f"{unique}_decl.py"
    module.write_text(
        "from listener import Listener\n"
        "class Declared(Listener):\n"
        f"    subscribes_to = '{unique}.job'\n"
        f"    queue = '{unique}.declared'\n"
        "    retry_delays = (2,)\n"
        "    def handle(self, message) -> None: ...\n"
    )
    for name in ("", ".dead", ".retry.2s"):
        rabbit.queues.add(f"{unique}.declared{name}")
    rabbit.track_delay_entry(f"{unique}.declared", f"{unique}.job")
    rabbit.exchanges.add(unique)
    env = {**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}

    declared = subprocess.run(
        [CLI, "declare", f"{unique}_decl", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert declared.returncode == 0, declared.stderr
    report = json.loads(declared.stdout)
    (item,) = report["declared"]
    assert item["queues"] == [
        f"{unique}.declared.dead",
        f"{unique}.declared.retry.2s",
        f"{unique}.declared",
    ]
    # The delay levels every listener shares, and the queue of messages no listener is left for.
    assert report["delay_levels"] == [
        *(delay.level_name(level) for level in range(delay.LEVELS)),
        delay.UNROUTED,
    ]

    published = cli("publish", f"{unique}.job", '{"n": 1}', "--json", url=amqp_url)
    assert published.returncode == 0, published.stderr
    message_id = json.loads(published.stdout)["message_id"]
    properties, _ = rabbit.wait_message(f"{unique}.declared")
    assert properties.message_id == message_id


async def test_two_commands_on_one_dead_queue_do_not_share_it(
    unique, rabbit, run_worker, operator, settings
):
    cls, ids = await park_one_of_each(unique, rabbit, run_worker, healed=[False])
    target = operator.target(cls.queue)
    with operator._peeking(target.dead_queue) as messages:
        next(messages)  # the first command holds the queue
        with Operator(settings) as other, pytest.raises(OperationFailed, match="another"):
            other.replay(other.target(cls.queue))
    # Once the first is done, the second sees every message.
    with Operator(settings) as other:
        assert [p.message_id for p in other.parked(other.target(cls.queue))] == ids


def test_copies_of_one_parked_message_are_replayed_once(unique, rabbit, operator):
    queue, dead = f"{unique}.twice", f"{unique}.twice.dead"
    rabbit.declare_queue(queue, **{"x-queue-type": "quorum"})
    rabbit.declare_queue(dead, **{"x-queue-type": "quorum", "x-delivery-limit": 2**31 - 1})
    for message_id in ("dup", "dup", "single"):
        rabbit.publish("", dead, b"{}", message_id=message_id, delivery_mode=2)

    result = operator.replay(operator.target(queue))

    assert sorted(result.done) == ["dup", "single"]
    assert sorted(p.message_id for p, _ in rabbit.drain(queue)) == ["dup", "single"]
    assert rabbit.count(dead) == 0
