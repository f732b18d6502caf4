"""The elected scheduler with real runners: one fires each tick, another takes over after a
kill -9, and a restart fires the latest missed tick once."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.runner_process import EXECUTABLE, REPO, clean_env
from support.waiting import wait_until

pytestmark = pytest.mark.slow


def read_ticks(path: Path) -> list[dt.datetime]:
    if not path.exists():
        return []
    return [dt.datetime.fromisoformat(line) for line in path.read_text().split()]


class Beats:
    """A module with one listener on an `every` schedule that writes each tick to a file,
    and `amqp-listener run` processes hosting it."""

    def __init__(self, unique: str, rabbit: Any, amqp_url: str, tmp_path: Path, every: int):
        self.module = f"{unique}_beat"
        self.tmp_path = tmp_path
        self.ticks_file = tmp_path / "ticks"
        (tmp_path / f"{self.module}.py").write_text(
            textwrap.dedent(f"""
            import datetime as dt
            from pydantic import BaseModel
            from listener import Listener

            class Tick(BaseModel):
                at: dt.datetime

            class Beat(Listener):
                subscribes_to = "{unique}.beat"
                queue = "{unique}.beat"
                every = dt.timedelta(seconds={every})

                def handle(self, message: Tick) -> None:
                    with open({str(self.ticks_file)!r}, "a") as out:
                        out.write(message.at.isoformat() + "\\n")
            """)
        )
        queue = f"{unique}.beat"
        rabbit.exchanges.add(unique)
        rabbit.queues.update({queue, f"{queue}.dead", f"{queue}.scheduler", f"{queue}.schedule"})
        rabbit.queues.update(f"{queue}.retry.{s}s" for s in (1, 5, 30))
        rabbit.track_delay_entry(queue, f"{unique}.beat")
        self.env = {**clean_env(tmp_path), "AMQP_URL": amqp_url, "PYTHONPATH": f"{tmp_path}:{REPO}"}
        self.runners: list[tuple[subprocess.Popen[bytes], Path]] = []

    def ticks(self) -> list[dt.datetime]:
        return read_ticks(self.ticks_file)

    def start(self) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp_path / f"runner{len(self.runners)}.log"
        with log.open("wb") as err:
            process = subprocess.Popen(
                [EXECUTABLE, "run", self.module], env=self.env, cwd=self.tmp_path, stderr=err
            )
        self.runners.append((process, log))
        return process, log

    def stop_all(self) -> None:
        for process, _log in self.runners:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _log in self.runners:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)


@pytest.fixture
def beats(unique: str, rabbit: Any, amqp_url: str, tmp_path: Path) -> Iterator[Any]:
    """`beats(every=seconds)`: a scheduled app; its runners are stopped after the test."""
    made: list[Beats] = []

    def make(every: int) -> Beats:
        made.append(Beats(unique, rabbit, amqp_url, tmp_path, every))
        return made[-1]

    yield make
    for app in made:
        app.stop_all()


def test_two_runners_fire_each_tick_once_and_a_kill_9_hands_the_schedule_over_within_10s(
    beats: Any,
) -> None:
    app = beats(every=1)
    runners = [app.start(), app.start()]

    wait_until(lambda: len(app.ticks()) >= 4, 40, "four ticks handled")
    before = app.ticks()
    # One tick per second, each handled once, though two runners take part.
    assert len(set(before)) == len(before)
    assert all(b - a == dt.timedelta(seconds=1) for a, b in itertools.pairwise(before))

    def leader() -> tuple[subprocess.Popen[bytes], Path] | None:
        leading = [r for r in runners if "scheduler: leading" in r[1].read_text()]
        return leading[0] if len(leading) == 1 else None

    killed, _log = wait_until(leader, 10, "one runner leading")
    survivor, survivor_log = next(r for r in runners if r[0] is not killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(10)
    at_kill = dt.datetime.now(dt.UTC)

    def ticked_after_kill() -> list[dt.datetime]:
        return [t for t in app.ticks() if t > at_kill]

    wait_until(ticked_after_kill, 10, "a tick from the other runner within 10 s")
    assert "scheduler: leading" in survivor_log.read_text()
    wait_until(lambda: len(ticked_after_kill()) >= 3, 10, "ticks going on")
    after = app.ticks()
    # At most the tick fired at the moment of the kill comes twice (same message id).
    assert len(after) - len(set(after)) <= 1

    listed = subprocess.run(
        [EXECUTABLE, "schedules", app.module, "--json"],
        env=app.env,
        cwd=app.tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)["schedules"]
    assert row["listener"] == f"{app.module}:Beat"
    assert row["expression"] == "every 1s"
    assert dt.datetime.fromisoformat(row["last_tick"]) > at_kill
    assert dt.datetime.fromisoformat(row["next_tick"]) > dt.datetime.fromisoformat(row["last_tick"])
    assert row["runner_pid"] == survivor.pid  # fired by the survivor's scheduler process
    assert row["pid"] != survivor.pid


def test_ticks_missed_while_no_runner_ran_fire_once_the_latest_of_them(beats: Any) -> None:
    app = beats(every=2)
    first, _log = app.start()
    wait_until(lambda: len(app.ticks()) >= 2, 40, "two ticks handled")
    first.send_signal(signal.SIGTERM)
    first.wait(30)
    last_before = app.ticks()[-1]
    stopped = dt.datetime.now(dt.UTC)
    wait_until(
        lambda: dt.datetime.now(dt.UTC) - stopped > dt.timedelta(seconds=7), 10, "ticks missed"
    )
    _second, log = app.start()

    wait_until(lambda: "missed while" in log.read_text(), 40, "the missed tick fired")
    (line,) = [x for x in log.read_text().splitlines() if "missed while" in x]
    late = dt.datetime.fromisoformat(line.split(" tick ")[1].split()[0])
    wait_until(lambda: late in app.ticks(), 10, "the missed tick handled")
    wait_until(lambda: app.ticks()[-1] > late, 10, "a regular tick after it")
    after_stop = [t for t in app.ticks() if t > last_before]
    # Four or more ticks fell while nothing ran: only the latest of them was fired, once.
    assert late - last_before >= dt.timedelta(seconds=8)
    assert after_stop[0] == late
    assert after_stop.count(late) == 1
    assert all(b - a == dt.timedelta(seconds=2) for a, b in itertools.pairwise(after_stop))


def test_the_scheduler_of_a_runner_given_a_list_of_nodes_fires_through_one_that_answers(
    beats: Any, amqp_url: str
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"amqp://guest:guest@127.0.0.1:{probe.getsockname()[1]}/%2F"
    app = beats(every=1)
    app.env["AMQP_URL"] = f"{dead},{amqp_url},{dead}"
    _process, log = app.start()

    wait_until(lambda: len(app.ticks()) >= 2, 40, "two ticks handled")
    assert "scheduler: leading" in log.read_text()
