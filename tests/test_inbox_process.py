"""The inbox in a real runner: every message delivered twice, and a worker killed between
its commit and its ack, still write each side effect exactly once."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from apps.inbox_app import effects
from support.runner_process import EXECUTABLE, REPO, RunnerProcess, clean_env
from support.waiting import wait_until

from listener import database

pytestmark = pytest.mark.slow

N = 30
DIES = 7  # the message whose first attempt kills its worker after the commit


def test_double_deliveries_and_a_kill_after_commit_write_each_effect_once(
    database_url: str, amqp_url: str, unique: str, rabbit: Any, tmp_path: Path
) -> None:
    queue = f"{unique}.effects"
    rabbit.exchanges.add(unique)
    rabbit.queues.update({queue, f"{queue}.dead", f"{queue}.retry.100ms"})
    rabbit.track_delay_entry(queue, f"{unique}.effect")
    engine = database.create_engine(database_url)
    effects.create(engine)
    env = {
        **clean_env(REPO),
        "AMQP_URL": amqp_url,
        "AMQP_LISTENER_DATABASE_URL": database_url,
        "APP_EXCHANGE": unique,
        "APP_QUEUE": queue,
        "APP_MARKER_DIR": str(tmp_path),
    }
    runner = RunnerProcess(
        [EXECUTABLE, "run", "tests.apps.inbox_app"], env, tmp_path / "out", tmp_path / "err"
    )
    try:
        runner.wait_started(1)
        for n in range(N):
            body = json.dumps({"n": n, "die_after_commit": n == DIES}).encode()
            message_id = uuid.uuid4().hex
            for _ in range(2):
                rabbit.publish(unique, "effect", body, message_id=message_id, delivery_mode=2)
        runner.wait_started(2, timeout=30)  # the killed worker was replaced
        wait_until(lambda: rows(engine) >= N, 30, "every message to be handled")
        runner.wait_log("was handled before (inbox)", count=N, timeout=30)
        runner.send(signal.SIGTERM)
        assert runner.wait_exit(30) == 0
    finally:
        runner.kill()
    try:
        assert rows(engine) == N
        with engine.connect() as connection:
            written = connection.execute(sa.select(effects.c.n).order_by(effects.c.n))
            assert written.scalars().all() == list(range(N))
        assert rabbit.count(queue) == 0  # nothing left unhandled
        assert (tmp_path / f"died-{DIES}").exists()
    finally:
        effects.drop(engine)
        engine.dispose()


def rows(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(effects)).scalar_one())
