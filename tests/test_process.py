"""The runner as a real process: signals, drains, kill -9, handlers that exit.

Each test starts `amqp-listener run tests.apps.gated` as a subprocess against the real
broker. That process is the supervisor; the handlers run in the one worker it forks (the
default `--workers 1`), so the worker's pid comes from the handler's marker files or from its
"worker pid=N consuming on" log line, never from the subprocess. The handler reports progress
through marker files (see tests/apps/gated.py), so the tests wait on events, never on fixed
sleeps. Several workers, crash loops and their back-off are tested in tests/test_supervisor.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.runner_process import MarkerApp, RunnerProcess
from support.waiting import alive

pytestmark = pytest.mark.slow

APP = "tests.apps.gated"


class Runner(RunnerProcess):
    """One `amqp-listener run` process (the supervisor); its workers are those that logged
    they consume."""

    worker_line = re.compile(r"worker pid=(\d+) consuming on")


class GatedApp(MarkerApp[Runner]):
    """The per-test instance of tests.apps.gated: its names, its marker files, its runners."""

    module = APP
    queue_suffix = ".gated"
    process_class = Runner
    message_id_prefix = "job"

    def start(self, *args: str, ready: bool = True, **env: str) -> Runner:
        """Start `amqp-listener run tests.apps.gated ARGS`; with `ready`, wait until it consumes."""
        runner = self.launch(APP, args, env)
        if ready:
            runner.wait_log("consuming on")
        return runner


@pytest.fixture
def app(unique: str, amqp_url: str, tmp_path: Path, rabbit: Any) -> Iterator[GatedApp]:
    with GatedApp(unique, amqp_url, tmp_path, rabbit) as gated:
        yield gated


def delivery_count(properties: Any) -> int:
    return int((properties.headers or {}).get("x-delivery-count", 0))


# -- stopping mid-message ----------------------------------------------------------------------


def test_a_handler_that_outlives_the_grace_period_leaves_its_message_in_the_queue(app, rabbit):
    runner = app.start("--grace", "1")
    app.publish(1, "wait")
    app.wait_marked("started", 1)

    sent = time.monotonic()
    runner.send(signal.SIGTERM)
    code = runner.wait_exit(10)
    took = time.monotonic() - sent

    assert code == 0, runner.stderr
    assert 0.9 <= took < 6, f"exited {took:.1f}s after SIGTERM with --grace 1"
    assert "did not finish within 1s" in runner.stderr
    properties, body = rabbit.wait_message(app.queue, timeout=5)
    assert json.loads(body) == {"n": 1, "action": "wait"}
    assert properties.message_id == "job-1"
    # Handed back as a confirmed copy, so the interruption is not counted as a worker death
    # (x-delivery-count) nor as a failed attempt (x-attempts).
    assert delivery_count(properties) == 0, properties.headers
    assert "x-attempts" not in (properties.headers or {})
    assert rabbit.count(app.dead) == 0
    assert app.marked("done", 1) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_during_the_drain_exits_at_once_and_hands_the_message_back(
    app, rabbit, signum
):
    runner = app.start("--grace", "30")
    app.publish(1, "wait")
    [worker] = app.wait_marked("started", 1)
    runner.send(signum)
    runner.wait_log("waiting up to 30s for 1 in-flight message(s)")

    sent = time.monotonic()
    runner.send(signum)
    code = runner.wait_exit(10)

    assert code == 128 + signum, runner.stderr
    assert time.monotonic() - sent < 3
    assert f"second signal ({signum.name})" in runner.stderr
    assert not alive(worker), "the worker outlived its supervisor"
    properties, body = rabbit.wait_message(app.queue, timeout=5)
    assert json.loads(body)["n"] == 1
    assert delivery_count(properties) == 1, properties.headers
    assert rabbit.count(app.dead) == 0
    assert app.marked("done", 1) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_message_lets_the_handler_finish_and_acks_it(app, rabbit, signum):
    runner = app.start("--grace", "15")
    app.publish(1, "wait")
    [worker] = app.wait_marked("started", 1)
    assert runner.worker_pids() == [worker]
    assert worker != runner.pid  # the handler runs in the supervisor's child

    runner.send(signum)
    runner.wait_log("waiting up to 15s for 1 in-flight message(s)")
    assert alive(worker)
    app.release(1)
    code = runner.wait_exit(10)

    assert code == 0, runner.stderr
    assert app.marked("done", 1) == [worker]
    # The supervisor heard the signal; the worker hears the SIGTERM it forwards.
    assert f"supervisor received {signum.name}: stopping 1 worker(s)" in runner.stderr
    assert "stopping (received SIGTERM)" in runner.stderr
    assert f"worker pid={worker} stopped: exited with code 0" in runner.stderr
    assert "1 worker(s) stopped cleanly" in runner.stderr
    assert "handled=1" in runner.stderr
    assert not alive(worker)
    assert "did not finish" not in runner.stderr
    assert "Traceback" not in runner.stderr
    assert rabbit.count(app.queue) == 0
    assert rabbit.count(app.dead) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_idle_exits_0_promptly(app, signum):
    runner = app.start()
    [worker] = runner.worker_pids()

    sent = time.monotonic()
    runner.send(signum)
    code = runner.wait_exit(10)

    assert code == 0, runner.stderr
    assert time.monotonic() - sent < 3
    assert f"supervisor received {signum.name}" in runner.stderr
    assert f"worker pid={worker} stopped: exited with code 0" in runner.stderr
    assert "1 worker(s) stopped cleanly" in runner.stderr
    assert "Traceback" not in runner.stderr
    assert not alive(worker)


def test_a_signal_while_retrying_an_unreachable_broker_exits_0_promptly(app):
    runner = app.start(
        ready=False,
        AMQP_URL="amqp://guest:guest@127.0.0.1:1/%2F",
        AMQP_LISTENER_CONNECT_ATTEMPTS="10",
    )
    runner.wait_log("broker not reachable (attempt 1 of 10)")

    sent = time.monotonic()
    runner.send(signal.SIGTERM)
    code = runner.wait_exit(10)
    took = time.monotonic() - sent

    assert code == 0, runner.stderr
    assert took < 5, f"exited {took:.1f}s after SIGTERM, still sleeping between connect attempts"
    assert "attempt 3 of 10" not in runner.stderr
    assert "Traceback" not in runner.stderr
    assert "amqp-listener: error" not in runner.stderr


# -- workers that die --------------------------------------------------------------------------
# A message that kills its worker on every delivery (parked as worker_lost after max_attempts
# deaths while the supervisor keeps restarting) is tested in tests/test_supervisor.py.


def test_a_worker_killed_mid_message_is_restarted_and_the_replacement_finishes_it(app, rabbit):
    runner = app.start()
    app.publish(1, "wait")
    [victim] = app.wait_marked("started", 1)
    assert runner.worker_pids() == [victim]
    assert victim != runner.pid

    os.kill(victim, signal.SIGKILL)
    runner.wait_log(f"worker pid={victim} died: killed by SIGKILL")
    app.release(1)

    [replacement] = app.wait_marked("done", 1)
    assert replacement not in (victim, runner.pid)
    assert app.marked("started", 1) == sorted([victim, replacement])
    assert runner.wait_started(2) == [victim, replacement]
    assert not runner.exited
    runner.send(signal.SIGTERM)
    assert runner.wait_exit(10) == 0, runner.stderr
    assert rabbit.count(app.queue) == 0
    assert rabbit.count(app.dead) == 0


def test_sys_exit_in_a_handler_lets_the_other_messages_finish_then_its_worker_is_replaced(
    app, rabbit
):
    # max_attempts 1: the message the handler exited on comes back unacked, so the
    # replacement finds one unfinished delivery and parks it at once (worker_lost); had the
    # exit been counted as a failed attempt, the exiting worker would have parked it (failed).
    runner = app.start("--grace", "15", APP_MAX_ATTEMPTS="1")
    app.publish(1, "wait")
    [worker] = app.wait_marked("started", 1)
    app.publish(2, "exit")
    assert app.wait_marked("started", 2) == [worker]

    runner.wait_log("waiting up to 15s for 1 in-flight message(s)")
    assert alive(worker), "the worker did not wait for its other in-flight message"
    app.release(1)
    runner.wait_log(f"worker pid={worker} died: exited with code 1")

    properties, body = rabbit.wait_message(app.dead, timeout=10)
    headers = properties.headers or {}
    assert json.loads(body) == {"n": 2, "action": "exit"}
    assert properties.message_id == "job-2"
    assert headers.get("x-parked-reason") == "worker_lost", headers
    assert app.marked("started", 2) == [worker]  # parked without running the handler again
    assert "SystemExit" in runner.stderr
    [first, replacement] = runner.wait_started(2)
    assert first == worker
    app.publish(3)
    assert app.wait_marked("done", 3) == [replacement]
    assert app.marked("done", 1) == [worker]  # finished and acked once, by the exiting worker
    assert app.marked("started", 1) == [worker]
    assert runner.stderr.count("died:") == 1, runner.stderr
    assert not runner.exited
    runner.send(signal.SIGTERM)
    assert runner.wait_exit(10) == 0, runner.stderr
    assert rabbit.count(app.queue) == 0
    assert rabbit.count(app.dead) == 0


# -- credentials -------------------------------------------------------------------------------


def test_a_refused_password_exits_1_at_once_with_one_line_that_hides_it(app):
    url = "amqp://guest:Sup3rS3cret@127.0.0.1:5672/%2F"

    started = time.monotonic()
    runner = app.start(ready=False, AMQP_URL=url)
    code = runner.wait_exit(15)
    took = time.monotonic() - started

    output = runner.stdout + runner.stderr
    lines = [line for line in runner.stderr.splitlines() if line.strip()]
    assert code == 1, output
    assert took < 5
    assert "Sup3rS3cret" not in output
    assert len(lines) == 1, output  # no retries, no traceback
    assert lines[0].startswith("amqp-listener: error:")
    assert "refused the login" in lines[0]
    assert "password" in lines[0]
    assert "guest:***@" in lines[0]


def test_the_runner_logs_the_broker_url_without_its_password(app, rabbit):
    runner = app.start("--log-level", "DEBUG", AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2F")
    app.publish(1)
    app.wait_marked("done", 1)
    runner.send(signal.SIGTERM)
    assert runner.wait_exit(10) == 0, runner.stderr

    output = runner.stdout + runner.stderr
    [ready_line] = [line for line in output.splitlines() if "consuming on" in line]
    assert "amqp://guest:***@127.0.0.1:5672/" in ready_line
    assert "guest:guest@" not in output
    assert rabbit.count(app.queue) == 0
