"""The elected scheduler with real runners: one fires each tick, another takes over after a
kill -9."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import textwrap
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


def test_two_runners_fire_each_tick_once_and_a_kill_9_hands_the_schedule_over_within_10s(
    unique: str, rabbit: Any, amqp_url: str, tmp_path: Path
) -> None:
    module = f"{unique}_beat"
    ticks_file = tmp_path / "ticks"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(f"""
        import datetime as dt
        import os
        from pydantic import BaseModel
        from listener import Listener

        class Tick(BaseModel):
            at: dt.datetime

        class Beat(Listener):
            subscribes_to = "{unique}.beat"
            queue = "{unique}.beat"
            every = dt.timedelta(seconds=1)

            def handle(self, message: Tick) -> None:
                with open({str(ticks_file)!r}, "a") as out:
                    out.write(message.at.isoformat() + "\\n")
        """)
    )
    queue = f"{unique}.beat"
    rabbit.exchanges.add(unique)
    rabbit.queues.update({queue, f"{queue}.dead", f"{queue}.scheduler", f"{queue}.schedule"})
    rabbit.queues.update(f"{queue}.retry.{s}s" for s in (1, 5, 30))
    rabbit.track_delay_levels(queue)
    env = {**clean_env(tmp_path), "AMQP_URL": amqp_url, "PYTHONPATH": f"{tmp_path}:{REPO}"}
    runners: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for n in range(2):
            log = tmp_path / f"runner{n}.log"
            with log.open("wb") as err:
                process = subprocess.Popen(
                    [EXECUTABLE, "run", module], env=env, cwd=tmp_path, stderr=err
                )
            runners.append((process, log))

        wait_until(lambda: len(read_ticks(ticks_file)) >= 4, 40, "four ticks handled")
        before = read_ticks(ticks_file)
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
            return [t for t in read_ticks(ticks_file) if t > at_kill]

        wait_until(ticked_after_kill, 10, "a tick from the other runner within 10 s")
        assert "scheduler: leading" in survivor_log.read_text()
        wait_until(lambda: len(ticked_after_kill()) >= 3, 10, "ticks going on")
        after = read_ticks(ticks_file)
        # At most the tick fired at the moment of the kill comes twice (same message id).
        assert len(after) - len(set(after)) <= 1

        listed = subprocess.run(
            [EXECUTABLE, "schedules", module, "--json"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)["schedules"]
        assert row["listener"] == f"{module}:Beat"
        assert row["expression"] == "every 1s"
        assert dt.datetime.fromisoformat(row["last_tick"]) > at_kill
        assert dt.datetime.fromisoformat(row["next_tick"]) > dt.datetime.fromisoformat(
            row["last_tick"]
        )
        assert row["runner_pid"] == survivor.pid  # fired by the survivor's scheduler process
        assert row["pid"] != survivor.pid
    finally:
        for process, _log in runners:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _log in runners:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
