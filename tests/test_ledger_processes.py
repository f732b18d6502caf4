"""The ledger with real processes: two runners sharing one PostgreSQL (two hosts, as far as
the ledger can tell), the workers view while slow handlers run, and a publisher that exits
right after notify()."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.runner_process import EXECUTABLE, REPO, MarkerApp, RunnerProcess, clean_env
from support.waiting import wait_until

pytestmark = pytest.mark.slow


class Runner(RunnerProcess):
    worker_line = re.compile(r"worker pid=(\d+) consuming on")


class GatedApp(MarkerApp[Runner]):
    module = "tests.apps.gated"
    queue_suffix = ".gated"
    process_class = Runner
    message_id_prefix = "job"


@pytest.fixture
def app(
    unique: str, amqp_url: str, tmp_path: Path, rabbit: Any, postgres_url: str
) -> Iterator[GatedApp]:
    from support.databases import empty_ledger

    empty_ledger(postgres_url)
    with GatedApp(unique, amqp_url, tmp_path, rabbit) as gated:
        yield gated


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXECUTABLE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
    )


def test_workers_shows_two_runners_busy_with_what_they_run_then_jobs_show_where_each_ran(
    app: GatedApp, postgres_url: str
) -> None:
    env = {"AMQP_LISTENER_DATABASE_URL": postgres_url, "APP_CONCURRENCY": "1"}
    app.declare()
    first = app.launch(app.module, [], env)
    second = app.launch(app.module, [], env)
    first.wait_log("consuming on")
    second.wait_log("consuming on")
    app.publish(1, "wait")
    app.publish(2, "wait")
    app.wait_marked("started", 1)
    app.wait_marked("started", 2)
    reader = app.env(AMQP_LISTENER_DATABASE_URL=postgres_url)

    def both_busy() -> dict[str, Any] | None:
        view = json.loads(cli("workers", "--json", env=reader).stdout)
        return view if view["busy"] == 2 else None

    view = wait_until(both_busy, 15, "both workers to report what they run")
    assert view["total"] == 2
    running = {w["running"][0]["message_id"]: w["pid"] for w in view["workers"]}
    assert set(running) == {"job-1", "job-2"}
    assert running["job-1"] != running["job-2"]
    table = cli("workers", env=reader).stdout
    assert table.splitlines()[0] == "2 of 2 workers busy"

    app.release(1)
    app.release(2)
    app.wait_marked("done", 2)

    def story(message_id: str) -> dict[str, Any] | None:
        shown = cli("jobs", "show", message_id, "--json", env=reader)
        document = json.loads(shown.stdout) if shown.returncode == 0 else None
        handled = document and document["jobs"][0]["state"] == "handled"
        return document if handled else None

    for message_id, pid in running.items():
        [job] = wait_until(lambda m=message_id: story(m), 15, f"{message_id} handled")["jobs"]
        [attempt] = job["attempts"]  # published by a foreign client: no publish record
        assert (attempt["outcome"], attempt["pid"]) == ("handled", pid)
        assert attempt["duration"] > 0


def test_a_message_killed_with_its_worker_shows_as_worker_lost_where_it_ran_then_handled(
    app: GatedApp, postgres_url: str
) -> None:
    env = {"AMQP_LISTENER_DATABASE_URL": postgres_url}
    app.declare()
    runner = app.launch(app.module, [], env)
    runner.wait_log("consuming on")
    app.publish(1, "wait")
    [victim] = app.wait_marked("started", 1)
    os.kill(victim, signal.SIGKILL)
    runner.wait_log(f"worker pid={victim} died")
    app.release(1)
    app.wait_marked("done", 1)
    reader = app.env(AMQP_LISTENER_DATABASE_URL=postgres_url)

    def story() -> dict[str, Any] | None:
        shown = cli("jobs", "show", "job-1", "--json", env=reader)
        document = json.loads(shown.stdout) if shown.returncode == 0 else None
        handled = document and document["jobs"][0]["state"] == "handled"
        return document if handled else None

    [job] = wait_until(story, 15, "job-1 handled")["jobs"]
    lost, handled = job["attempts"]
    assert (lost["outcome"], lost["pid"]) == ("worker_lost", victim)
    assert handled["outcome"] == "handled" and handled["pid"] != victim
    runner.send(signal.SIGTERM)
    assert runner.wait_exit(15) == 0, runner.stderr


def test_a_publisher_that_exits_right_after_notify_leaves_its_pending_row(
    app: GatedApp, postgres_url: str
) -> None:
    app.declare()
    env = app.env(AMQP_LISTENER_DATABASE_URL=postgres_url)
    script = "from tests.apps.gated import Gated; print(Gated.notify(n=7))"
    published = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**clean_env(REPO), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    message_id = published.stdout.strip()
    shown = cli("jobs", "show", message_id, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    [job] = json.loads(shown.stdout)["jobs"]
    assert job["state"] == "pending"
    assert job["where"] == app.queue
    [publish] = job["attempts"]
    assert publish["outcome"] == "published"


def test_jobs_commands_without_a_database_say_how_to_turn_the_ledger_on(app: GatedApp) -> None:
    env = app.env()
    for args in (["jobs", "show", "x"], ["jobs", "list"], ["workers"]):
        result = cli(*args, env=env)
        assert result.returncode == 1
        [line] = result.stderr.splitlines()
        assert "AMQP_LISTENER_DATABASE_URL" in line


def test_jobs_commands_on_an_unreachable_database_fail_in_one_line_without_the_password(
    app: GatedApp,
) -> None:
    env = app.env(AMQP_LISTENER_DATABASE_URL="postgresql://postgres:hunter2@127.0.0.1:1/x")
    for args in (["jobs", "show", "x"], ["jobs", "list"], ["workers"]):
        result = cli(*args, env=env)
        assert result.returncode == 1
        [line] = result.stderr.splitlines()
        assert "unreachable" in line
        assert "hunter2" not in result.stderr + result.stdout


def test_run_with_database_url_records_what_its_workers_handle(
    app: GatedApp, postgres_url: str
) -> None:
    app.declare()
    runner = app.launch(app.module, ["--workers", "2", "--database-url", postgres_url], {})
    runner.wait_log("consuming on", count=2)
    app.publish(3, "ok")
    reader = app.env(AMQP_LISTENER_DATABASE_URL=postgres_url)

    def handled() -> dict[str, Any] | None:
        shown = cli("jobs", "show", "job-3", "--json", env=reader)
        document = json.loads(shown.stdout) if shown.returncode == 0 else None
        return document if document and document["jobs"][0]["state"] == "handled" else None

    [job] = wait_until(handled, 15, "job-3 handled")["jobs"]
    assert job["attempts"][0]["pid"] in runner.worker_pids()
    view = json.loads(cli("workers", "--json", env=reader).stdout)
    assert view["total"] == 2  # the workers, not the supervisor
