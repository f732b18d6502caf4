"""The runner as a real process: signals, drains, kill -9, handlers that exit or kill.

Each test starts `amqp-listener run tests.apps.gated` as a subprocess against the real
broker. The handler reports progress through marker files (see tests/apps/gated.py), so the
tests wait on events, never on fixed sleeps; the test itself plays the supervisor when a
worker has to be restarted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
EXECUTABLE = os.path.join(os.path.dirname(sys.executable), "amqp-listener")
APP = "tests.apps.gated"
RETRY_QUEUE_SUFFIX = ".retry.100ms"  # the app's retry_delays = (0.1,)

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Runner:
    """One `amqp-listener run` process; its stdout and stderr go to files."""

    def __init__(self, process: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.process = process
        self.pid = process.pid
        self._out = out
        self._err = err

    @property
    def stdout(self) -> str:
        return self._out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.read_text(errors="replace")

    @property
    def exited(self) -> bool:
        return self.process.poll() is not None

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"runner pid={self.pid} still running after {timeout}s; stderr:\n{self.stderr}"
            ) from None

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        """Wait until `text` appears on stderr; fail at once if the process exits first."""

        def seen() -> bool:
            if text in self.stderr:
                return True
            if self.exited and text not in self.stderr:
                raise AssertionError(
                    f"runner exited ({self.process.returncode}) before logging {text!r}; "
                    f"stderr:\n{self.stderr}"
                )
            return False

        wait_until(seen, timeout, f"{text!r} on stderr of pid {self.pid}")


class GatedApp:
    """The per-test instance of tests.apps.gated: its names, its marker files, its runners."""

    def __init__(self, unique: str, amqp_url: str, tmp_path: Path, rabbit: Any) -> None:
        self.exchange = unique
        self.queue = f"{unique}.gated"
        self.dead = f"{self.queue}.dead"
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        self.logs = tmp_path
        self.amqp_url = amqp_url
        self.rabbit = rabbit
        self.runners: list[Runner] = []
        rabbit.exchanges.add(self.exchange)
        rabbit.queues.update({self.queue, self.dead, self.queue + RETRY_QUEUE_SUFFIX})

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("AMQP_LISTENER_", "AMQP_URL"))
        }
        env.update(
            AMQP_URL=self.amqp_url,
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
            APP_EXCHANGE=self.exchange,
            APP_QUEUE=self.queue,
            APP_MARKER_DIR=str(self.markers),
        )
        env.update(overrides)
        return env

    def start(self, *args: str, ready: bool = True, **env: str) -> Runner:
        """Start `amqp-listener run tests.apps.gated ARGS`; with `ready`, wait until it consumes."""
        index = len(self.runners)
        out, err = self.logs / f"runner-{index}.out", self.logs / f"runner-{index}.err"
        with out.open("wb") as out_file, err.open("wb") as err_file:
            process = subprocess.Popen(
                [EXECUTABLE, "run", APP, *args],
                cwd=REPO,
                env=self.env(**env),
                stdout=out_file,
                stderr=err_file,
            )
        runner = Runner(process, out, err)
        self.runners.append(runner)
        if ready:
            runner.wait_log("consuming on")
        return runner

    def declare(self) -> None:
        subprocess.run(
            [EXECUTABLE, "declare", APP],
            cwd=REPO,
            env=self.env(),
            check=True,
            capture_output=True,
            timeout=20,
        )

    def publish(self, n: int, action: str = "ok") -> None:
        self.rabbit.publish(
            self.exchange,
            "work",
            json.dumps({"n": n, "action": action}).encode(),
            content_type="application/json",
            delivery_mode=2,
            message_id=f"job-{n}",
        )

    def marked(self, event: str, n: int) -> list[int]:
        """Pids of the processes that reported `event` for message `n`."""
        return sorted(int(p.read_text()) for p in self.markers.glob(f"{event}-{n}-*"))

    def wait_marked(self, event: str, n: int, timeout: float = 10.0) -> list[int]:
        return wait_until(lambda: self.marked(event, n), timeout, f"{event} of message {n}")

    def release(self, n: int) -> None:
        (self.markers / f"release-{n}").write_text("go")

    def kill_all(self) -> None:
        for runner in self.runners:
            if not runner.exited:
                runner.process.kill()
                runner.process.wait(10)


@pytest.fixture
def app(unique: str, amqp_url: str, tmp_path: Path, rabbit: Any) -> Iterator[GatedApp]:
    gated = GatedApp(unique, amqp_url, tmp_path, rabbit)
    try:
        yield gated
    finally:
        gated.kill_all()  # before `rabbit` deletes the queues under them


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
    app.wait_marked("started", 1)
    runner.send(signum)
    runner.wait_log("waiting up to 30s for 1 in-flight message(s)")

    sent = time.monotonic()
    runner.send(signum)
    code = runner.wait_exit(10)

    assert code == 128 + signum, runner.stderr
    assert time.monotonic() - sent < 3
    assert f"second signal ({signum.name})" in runner.stderr
    properties, body = rabbit.wait_message(app.queue, timeout=5)
    assert json.loads(body)["n"] == 1
    assert delivery_count(properties) == 1, properties.headers
    assert rabbit.count(app.dead) == 0
    assert app.marked("done", 1) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_message_lets_the_handler_finish_and_acks_it(app, rabbit, signum):
    runner = app.start("--grace", "15")
    app.publish(1, "wait")
    [pid] = app.wait_marked("started", 1)
    assert pid == runner.pid

    runner.send(signum)
    runner.wait_log("waiting up to 15s for 1 in-flight message(s)")
    app.release(1)
    code = runner.wait_exit(10)

    assert code == 0, runner.stderr
    assert app.marked("done", 1) == [runner.pid]
    assert f"stopping (received {signum.name})" in runner.stderr
    assert f"worker pid={runner.pid} stopped" in runner.stderr
    assert "handled=1" in runner.stderr
    assert "did not finish" not in runner.stderr
    assert "Traceback" not in runner.stderr
    assert rabbit.count(app.queue) == 0
    assert rabbit.count(app.dead) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_idle_exits_0_promptly(app, signum):
    runner = app.start()

    sent = time.monotonic()
    runner.send(signum)
    code = runner.wait_exit(10)

    assert code == 0, runner.stderr
    assert time.monotonic() - sent < 3
    assert f"worker pid={runner.pid} stopped" in runner.stderr
    assert "Traceback" not in runner.stderr


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


def test_a_message_whose_worker_is_killed_is_redelivered_and_finished_by_the_next(app, rabbit):
    first = app.start()
    app.publish(1, "wait")
    assert app.wait_marked("started", 1) == [first.pid]

    first.process.kill()
    assert first.wait_exit(10) == -signal.SIGKILL
    app.release(1)
    second = app.start()

    assert app.wait_marked("done", 1) == [second.pid]
    assert sorted(app.marked("started", 1)) == sorted([first.pid, second.pid])
    second.send(signal.SIGTERM)
    assert second.wait_exit(10) == 0, second.stderr
    assert rabbit.count(app.queue) == 0
    assert rabbit.count(app.dead) == 0


def test_a_message_that_kills_every_worker_is_parked_after_max_attempts_deaths(app, rabbit):
    # One message at a time, so the good message is never in flight when a worker dies.
    settings = {"APP_MAX_ATTEMPTS": "2", "APP_CONCURRENCY": "1"}
    app.declare()
    app.publish(1, "die")
    app.publish(2, "ok")

    deaths = 0
    survivor: Runner | None = None
    for _ in range(5):  # more than enough runs: a looping poison message would exhaust them
        runner = app.start(ready=False, **settings)
        wait_until(lambda r=runner: r.exited or app.marked("done", 2), 15, "a death or message 2")
        if not runner.exited:
            survivor = runner
            break
        assert runner.process.returncode == -signal.SIGKILL, runner.stderr
        deaths += 1

    assert survivor is not None, f"no worker survived {deaths} runs: the poison message loops"
    assert deaths == 2
    assert len(app.marked("started", 1)) == 2  # the third delivery was parked unhandled
    properties, body = rabbit.wait_message(app.dead, timeout=5)
    headers = properties.headers or {}
    assert json.loads(body) == {"n": 1, "action": "die"}
    assert properties.message_id == "job-1"
    assert headers.get("x-parked-reason") == "worker_lost", headers
    assert headers.get("x-listener") == f"{APP}:Gated"
    assert "died" in str(headers.get("x-exception-message")), headers
    assert app.marked("done", 2) == [survivor.pid]
    survivor.send(signal.SIGTERM)
    assert survivor.wait_exit(10) == 0, survivor.stderr
    assert "parked (worker_lost)" in survivor.stderr
    assert rabbit.count(app.queue) == 0
    assert rabbit.count(app.dead) == 0


def test_sys_exit_in_a_handler_stops_the_worker_with_1_and_leaves_the_message_unacked(app, rabbit):
    runner = app.start()
    app.publish(1, "exit")

    code = runner.wait_exit(15)

    assert code == 1, runner.stderr
    assert app.marked("started", 1) == [runner.pid]
    assert "SystemExit" in runner.stderr
    assert f"worker pid={runner.pid} stopped" in runner.stderr
    properties, body = rabbit.wait_message(app.queue, timeout=5)
    assert json.loads(body) == {"n": 1, "action": "exit"}
    assert "x-attempts" not in (properties.headers or {})  # not treated as a failed attempt
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
