"""The runner as a real process: signals, drains, kill -9, handlers that exit.

Each test starts `amqp-listener run tests.apps.gated` as a subprocess against the real
broker. That process is the supervisor; the handlers run in the one worker it forks (the
default `--workers 1`), so the worker's pid comes from the handler's marker files or from its
"worker pid=N consuming on" log line, never from the subprocess. The handler reports progress
through marker files (see tests/apps/gated.py), so the tests wait on events, never on fixed
sleeps. Several workers, crash loops and their back-off are tested in tests/test_supervisor.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.waiting import alive, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
EXECUTABLE = os.path.join(os.path.dirname(sys.executable), "amqp-listener")
APP = "tests.apps.gated"
RETRY_QUEUE_SUFFIX = ".retry.100ms"  # the app's retry_delays = (0.1,)
CONSUMING = re.compile(r"worker pid=(\d+) consuming on")


class Runner:
    """One `amqp-listener run` process (the supervisor); its stdout and stderr go to files."""

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

    def worker_pids(self) -> list[int]:
        """Pids of the workers that logged they consume, in order."""
        return [int(pid) for pid in CONSUMING.findall(self.stderr)]

    def wait_workers(self, count: int, timeout: float = 10.0) -> list[int]:
        """Wait until `count` workers (the first and its replacements) logged they consume."""
        return wait_until(
            lambda: (pids := self.worker_pids()) and len(pids) >= count and pids,
            timeout,
            f"{count} worker(s) consuming under pid {self.pid}",
        )

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
            workers = runner.worker_pids()
            if not runner.exited:
                runner.process.kill()
                runner.process.wait(10)
            for pid in workers:  # they die with the supervisor; this is belt and braces
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


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
    assert runner.wait_workers(2) == [victim, replacement]
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
    [first, replacement] = runner.wait_workers(2)
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
