"""The relay as users run it: `amqp-listener relay` and `run --outbox`, real processes, the
real broker, PostgreSQL and SQLite. Kill -9 mid-batch, two relays at once, SIGTERM."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from support.runner_process import EXECUTABLE, REPO, RunnerProcess, clean_env
from support.waiting import wait_until

import listener
from listener import database, outbox
from listener.outbox import outbox_table
from listener.relay import BATCH_SIZE

pytestmark = pytest.mark.slow

N = 5_000


class RelayProcess(RunnerProcess):
    role = "relay"


def start_relay(env: dict[str, str], tmp_path: Path, name: str) -> RelayProcess:
    return RelayProcess(
        [EXECUTABLE, "relay"], env, tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    )


@pytest.fixture
def env(database_url: str, amqp_url: str, unique: str, tmp_path: Path) -> dict[str, str]:
    return {
        **clean_env(REPO),
        "AMQP_URL": amqp_url,
        "AMQP_LISTENER_DATABASE_URL": database_url,
        "APP_EXCHANGE": unique,
        "APP_QUEUE": f"{unique}.gated",
        "APP_MARKER_DIR": str(tmp_path),
    }


@pytest.fixture
def engine(database_url: str) -> Any:
    engine = database.create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def queue(unique: str, rabbit: Any) -> str:
    rabbit.declare_exchange(unique)
    rabbit.declare_queue(f"{unique}.orders", bind=(unique, "placed"))
    return f"{unique}.orders"


def write(engine: sa.Engine, unique: str, n: int) -> None:
    """Commit `n` outbox rows `{"n": 0}` ... `{"n": n - 1}` for `<unique>.placed`."""
    bodies = [json.dumps({"n": i}).encode() for i in range(n)]
    with Session(engine) as session, session.begin():
        outbox.write(session, unique, "placed", bodies)


def waiting(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(sa.select(sa.func.count()).select_from(outbox_table)).scalar_one()
        )


def published(rabbit: Any, queue: str) -> collections.Counter[int]:
    return collections.Counter(json.loads(body)["n"] for _, body in rabbit.drain(queue))


def test_the_relay_command_publishes_what_committed_and_stops_on_sigterm(
    env: dict[str, str], engine: sa.Engine, unique: str, queue: str, rabbit: Any, tmp_path: Path
) -> None:
    relay = start_relay(env, tmp_path, "relay")
    try:
        relay.wait_log("outbox relay started")
        write(engine, unique, 100)
        wait_until(lambda: waiting(engine) == 0, 15, "the outbox to empty")
        relay.send(signal.SIGTERM)
        assert relay.wait_exit(15) == 0
    finally:
        relay.kill()
    assert published(rabbit, queue) == collections.Counter(range(100))
    assert "published=100" in relay.stderr


def test_sigterm_mid_stream_stops_the_relay_once_its_batch_is_settled(
    env: dict[str, str], engine: sa.Engine, unique: str, queue: str, rabbit: Any, tmp_path: Path
) -> None:
    write(engine, unique, N)
    relay = start_relay(env, tmp_path, "relay")
    try:
        wait_until(lambda: rabbit.count(queue) > 0, 20, "the first messages")
        relay.send(signal.SIGTERM)  # a batch is under way
        assert relay.wait_exit(15) == 0
    finally:
        relay.kill()
    left = waiting(engine)
    counts = published(rabbit, queue)
    sent = sum(counts.values())
    assert left > 0, "the relay published everything before the signal: nothing was tested"
    assert max(counts.values()) == 1
    # Whole batches went out, and each was deleted: the batch under way was finished and
    # settled, neither cut short nor left to be published again.
    assert sent % BATCH_SIZE == 0
    assert sent + left == N
    assert f"published={sent}" in relay.stderr


def test_the_relay_takes_its_urls_from_url_and_database_url(
    env: dict[str, str], engine: sa.Engine, unique: str, queue: str, rabbit: Any, tmp_path: Path
) -> None:
    flags = ["--url", env["AMQP_URL"], "--database-url", env["AMQP_LISTENER_DATABASE_URL"]]
    bare = {k: v for k, v in env.items() if k not in ("AMQP_URL", "AMQP_LISTENER_DATABASE_URL")}
    relay = RelayProcess(
        [EXECUTABLE, "relay", *flags], bare, tmp_path / "relay.out", tmp_path / "relay.err"
    )
    try:
        relay.wait_log("outbox relay started")
        write(engine, unique, 10)
        wait_until(lambda: waiting(engine) == 0, 15, "the outbox to empty")
        relay.send(signal.SIGTERM)
        assert relay.wait_exit(15) == 0
    finally:
        relay.kill()
    assert published(rabbit, queue) == collections.Counter(range(10))


def test_the_relay_without_a_database_exits_2_naming_the_setting(
    env: dict[str, str],
) -> None:
    env = {k: v for k, v in env.items() if k != "AMQP_LISTENER_DATABASE_URL"}
    result = subprocess.run(
        [EXECUTABLE, "relay"], env=env, capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert result.returncode == 2
    assert "AMQP_LISTENER_DATABASE_URL" in result.stderr


def test_a_relay_killed_mid_batch_loses_nothing_and_duplicates_at_most_one_batch(
    env: dict[str, str], engine: sa.Engine, unique: str, queue: str, rabbit: Any, tmp_path: Path
) -> None:
    write(engine, unique, N)
    first = start_relay(env, tmp_path, "first")
    try:
        wait_until(lambda: rabbit.count(queue) > 0, 20, "the first messages")
    finally:
        first.kill()  # SIGKILL, whatever it was doing
    assert waiting(engine) > 0, "the relay finished before the kill: nothing was tested"
    second = start_relay(env, tmp_path, "second")
    try:
        wait_until(lambda: waiting(engine) == 0, 30, "the outbox to empty")
        second.send(signal.SIGTERM)
        second.wait_exit(15)
    finally:
        second.kill()
    counts = published(rabbit, queue)
    assert set(counts) == set(range(N))  # nothing lost
    duplicates = sum(counts.values()) - N
    assert duplicates <= BATCH_SIZE


def test_two_relays_at_once_publish_everything_once(
    env: dict[str, str], engine: sa.Engine, unique: str, queue: str, rabbit: Any, tmp_path: Path
) -> None:
    write(engine, unique, N)
    relays = [start_relay(env, tmp_path, f"relay{i}") for i in (1, 2)]
    try:
        wait_until(lambda: waiting(engine) == 0, 30, "the outbox to empty")
        for relay in relays:
            relay.send(signal.SIGTERM)
        assert [relay.wait_exit(15) for relay in relays] == [0, 0]
    finally:
        for relay in relays:
            relay.kill()
    assert published(rabbit, queue) == collections.Counter(range(N))


def test_run_with_outbox_starts_a_relay_beside_the_workers_and_status_shows_the_lag(
    env: dict[str, str], engine: sa.Engine, unique: str, rabbit: Any, tmp_path: Path
) -> None:
    rabbit.exchanges.add(unique)
    rabbit.queues.update({f"{unique}.gated", f"{unique}.gated.dead", f"{unique}.gated.retry.100ms"})
    rabbit.track_delay_entry(f"{unique}.gated", f"{unique}.work")
    runner = RunnerProcess(
        [EXECUTABLE, "run", "tests.apps.gated", "--outbox"],
        env,
        tmp_path / "run.out",
        tmp_path / "run.err",
    )
    try:
        runner.wait_log("outbox relay started")
        runner.wait_started(1)
        with Session(engine) as session, session.begin():
            listener.publish(f"{unique}.work", {"n": 1, "action": "ok"}, session=session)
        wait_until(lambda: list(tmp_path.glob("done-1-*")), 15, "message 1 to be handled")
        status = subprocess.run(
            [EXECUTABLE, "status", "tests.apps.gated", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["outbox"] == {
            "rows_waiting": 0,
            "oldest_age_seconds": None,
        }
        runner.send(signal.SIGTERM)
        assert runner.wait_exit(30) == 0
    finally:
        runner.kill()
    assert "outbox relay stopped" in runner.stderr


RELAY_SERVING = re.compile(r"outbox relay pid=(\d+) serving ")


def test_run_with_outbox_restarts_a_relay_killed_9(
    env: dict[str, str], engine: sa.Engine, unique: str, rabbit: Any, tmp_path: Path
) -> None:
    rabbit.exchanges.add(unique)
    rabbit.queues.update({f"{unique}.gated", f"{unique}.gated.dead", f"{unique}.gated.retry.100ms"})
    rabbit.track_delay_entry(f"{unique}.gated", f"{unique}.work")
    runner = RunnerProcess(
        [EXECUTABLE, "run", "tests.apps.gated", "--outbox"],
        env,
        tmp_path / "run.out",
        tmp_path / "run.err",
    )
    try:
        runner.wait_started(1)
        runner.wait_log("outbox relay started")
        first = int(RELAY_SERVING.findall(runner.stderr)[0])
        os.kill(first, signal.SIGKILL)
        runner.wait_log(f"outbox relay pid={first} died: killed by SIGKILL")
        runner.wait_log("outbox relay started", count=2, timeout=30)
        with Session(engine) as session, session.begin():
            listener.publish(f"{unique}.work", {"n": 1, "action": "ok"}, session=session)
        wait_until(lambda: list(tmp_path.glob("done-1-*")), 15, "message 1 to be handled")
        runner.send(signal.SIGTERM)
        assert runner.wait_exit(30) == 0
    finally:
        runner.kill()


WRITER = """
import os, signal, sys
from sqlalchemy.orm import Session
import listener
from listener import database

engine = database.create_engine(sys.argv[1])
with Session(engine) as session, session.begin():
    for n in range(100):
        listener.publish(sys.argv[2] + ".placed", {"n": n}, session=session)
os.kill(os.getpid(), signal.SIGKILL)  # right after the commit, before anything else
"""


def test_a_writer_killed_right_after_its_commit_loses_nothing(
    env: dict[str, str], engine: sa.Engine, unique: str, queue: str, rabbit: Any, tmp_path: Path
) -> None:
    writer = subprocess.run(
        [sys.executable, "-c", WRITER, env["AMQP_LISTENER_DATABASE_URL"], unique],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert writer.returncode == -signal.SIGKILL, writer.stderr
    relay = start_relay(env, tmp_path, "relay")
    try:
        wait_until(lambda: waiting(engine) == 0, 20, "the outbox to empty")
        relay.send(signal.SIGTERM)
        relay.wait_exit(15)
    finally:
        relay.kill()
    assert published(rabbit, queue) == collections.Counter(range(100))
