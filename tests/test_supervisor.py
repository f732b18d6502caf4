"""The supervisor as real processes: `amqp-listener run tests.apps.fleet --workers N`.

Each test starts the console script against the real broker. Handlers report progress
through marker files (see tests/apps/fleet.py), one file per handling, so the tests count
messages lost (must be 0) and handled twice; worker pids come from the supervisor's log
("worker 1 of 2 started: pid=..."). Liveness of a pid is read from /proc (a zombie counts as
gone: it holds no socket and runs no code).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pika
import pytest
from support.runner_process import MarkerApp, RunnerProcess
from support.waiting import alive, wait_until

from listener.errors import ConfigurationError
from listener.runner import run
from listener.settings import Settings

pytestmark = pytest.mark.slow

APP = "tests.apps.fleet"
DIED = re.compile(r"worker pid=(\d+) died: (.+) after [\d.]+s; restarting in ([\d.]+)s")


def delivery_count(properties: Any) -> int:
    return int((properties.headers or {}).get("x-delivery-count", 0))


class Supervised(RunnerProcess):
    """One `amqp-listener run ... --workers N` process; its stdout and stderr go to files."""

    role = "supervisor"

    def deaths(self) -> list[tuple[int, str, float]]:
        """(pid, how, restart delay) of every death the supervisor reported."""
        return [(int(pid), how, float(delay)) for pid, how, delay in DIED.findall(self.stderr)]

    def wait_all_gone(self, pids: list[int], timeout: float) -> None:
        wait_until(
            lambda: not any(alive(pid) for pid in pids),
            timeout,
            f"processes {[pid for pid in pids if alive(pid)]} to end",
        )


class FleetApp(MarkerApp[Supervised]):
    """The per-test instance of tests.apps.fleet: its names, its marker files, its runs."""

    module = APP
    queue_suffix = ".fleet"
    process_class = Supervised
    message_id_prefix = "task"
    message_defaults: ClassVar[dict[str, object]] = {"seconds": 0.0}

    def start(
        self,
        *args: str,
        module: str = APP,
        ready: int = 0,
        new_session: bool = False,
        **env: str,
    ) -> Supervised:
        """Start `amqp-listener run MODULE ARGS`; wait until `ready` workers consume.

        With `new_session` the supervisor leads a process group of its own, like a command
        started from a shell (a terminal's Ctrl-C signals that whole group).
        """
        supervised = self.launch(module, args, env, new_session=new_session)
        if ready:
            supervised.wait_started(ready)
        return supervised

    def done_counts(self) -> Counter[int]:
        """How many times each message was handled to the end."""
        return Counter(int(p.name.split("-")[1]) for p in self.markers.glob("done-*"))


@pytest.fixture
def app(unique: str, amqp_url: str, tmp_path: Path, rabbit: Any) -> Iterator[FleetApp]:
    with FleetApp(unique, amqp_url, tmp_path, rabbit) as fleet:
        yield fleet


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("amqp-listener: error: "), lines[0]
    return lines[0]


# -- start-up errors: reported once, before any worker exists ----------------------------------


def test_a_refused_password_with_two_workers_exits_1_at_once_with_one_line(app):
    url = "amqp://guest:Sup3rS3cret@127.0.0.1:5672/%2F"

    started = time.monotonic()
    supervised = app.start("--workers", "2", AMQP_URL=url)
    code = supervised.wait_exit(15)

    output = supervised.stdout + supervised.stderr
    assert code == 1, output
    assert time.monotonic() - started < 5
    line = one_error_line(supervised.stderr)
    assert "refused the login" in line
    assert "guest:***@" in line
    assert "Sup3rS3cret" not in output


def test_a_missing_module_with_two_workers_exits_2_with_one_line(app):
    supervised = app.start("--workers", "2", module="tests.apps.does_not_exist")

    code = supervised.wait_exit(15)

    assert code == 2, supervised.stderr
    assert "'tests.apps.does_not_exist'" in one_error_line(supervised.stderr)
    assert supervised.worker_pids() == []


def test_an_unreachable_broker_with_two_workers_and_fail_fast_exits_1_with_one_line(app):
    url = "amqp://guest:guest@127.0.0.1:1/%2F"

    started = time.monotonic()
    supervised = app.start("--workers", "2", "--fail-fast", AMQP_URL=url)
    code = supervised.wait_exit(15)

    assert code == 1, supervised.stderr
    assert time.monotonic() - started < 5
    line = one_error_line(supervised.stderr)
    assert "cannot connect to amqp://guest:***@127.0.0.1:1/" in line
    assert "gave up after 1 attempt" in line


def test_a_queue_declared_with_other_arguments_stops_the_start_with_one_line_and_no_worker(
    app, rabbit
):
    rabbit.declare_queue(app.queue)  # a classic queue where the framework wants a quorum one

    supervised = app.start("--workers", "2")
    code = supervised.wait_exit(15)

    assert code == 1, supervised.stderr
    line = one_error_line(supervised.stderr)
    assert app.queue in line
    assert supervised.worker_pids() == []


def test_a_queue_held_by_an_exclusive_consumer_stops_the_start_with_one_error_line(app, amqp_url):
    # Only a worker meets this one (the start-up check does not consume): the first workers'
    # failure must still end the start with the error, not a restart loop.
    env = {"AMQP_LISTENER_QUEUE_TYPE": "classic"}  # quorum queues ignore exclusive consumers
    app.declare(**env)
    holder = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        holder.channel().basic_consume(app.queue, lambda *_: None, exclusive=True)
        started = time.monotonic()
        supervised = app.start("--workers", "2", **env)
        code = supervised.wait_exit(15)
        took = time.monotonic() - started
    finally:
        holder.close()

    assert code == 1, supervised.stderr
    assert took < 10
    errors = [line for line in supervised.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, supervised.stderr
    assert errors[0].startswith("amqp-listener: error: ")
    assert repr(app.queue) in errors[0]
    assert "exclusive" in errors[0]
    assert supervised.stderr.splitlines()[-1] == errors[0]
    assert supervised.deaths() == []
    assert "Traceback" not in supervised.stderr


def test_run_refuses_zero_workers_before_touching_the_broker():
    settings = Settings(url="amqp://guest:guest@127.0.0.1:1/%2F", connect_attempts=1)

    with pytest.raises(ConfigurationError, match="at least 1"):
        run([], settings, workers=0)


# -- workers that die --------------------------------------------------------------------------


def test_a_worker_killed_mid_message_is_replaced_and_its_message_is_handled_by_another(app, rabbit):
    supervised = app.start("--workers", "2", ready=2, APP_MAX_ATTEMPTS="3")
    first_two = supervised.worker_pids()
    assert len(first_two) == 2
    app.publish(1, "wait")
    [victim] = app.wait_marked("started", 1)
    assert victim in first_two
    [survivor] = [pid for pid in first_two if pid != victim]

    os.kill(victim, signal.SIGKILL)

    supervised.wait_log(f"worker pid={victim} died: killed by SIGKILL")
    supervised.wait_started(3)
    [replacement] = [pid for pid in supervised.worker_pids() if pid not in first_two]
    restarted_by = app.wait_marked("started", 1, count=2)
    assert victim in restarted_by
    # The other live worker takes whatever message 2 is: both live workers get work.
    app.publish(2, "wait")
    app.wait_marked("started", 2)
    holders = {pid for n in (1, 2) for pid in app.marked("started", n) if pid != victim}
    assert holders == {survivor, replacement}
    app.release(1)
    app.release(2)
    wait_until(lambda: app.done_counts() == {1: 1, 2: 1}, 10, "messages 1 and 2 done")

    assert victim not in app.marked("done", 1)
    [(pid, how, _delay)] = supervised.deaths()
    assert (pid, how) == (victim, "killed by SIGKILL")
    assert not supervised.exited
    supervised.send(signal.SIGTERM)
    assert supervised.wait_exit(15) == 0, supervised.stderr
    assert rabbit.count(app.queue) == 0
    assert rabbit.count(app.dead) == 0


def test_a_message_that_crashes_every_worker_is_parked_while_restarts_slow_down(app, rabbit):
    # One worker, one message at a time: the poison message is always the one in flight.
    supervised = app.start("--workers", "1", ready=1, APP_MAX_ATTEMPTS="3")
    app.publish(1, "crash")
    for n in range(2, 5):
        app.publish(n)

    wait_until(lambda: app.done_counts() == {2: 1, 3: 1, 4: 1}, 20, "the good messages")

    deaths = supervised.deaths()
    assert [how for _pid, how, _delay in deaths] == ["exited with code 70"] * 3
    delays = [delay for _pid, _how, delay in deaths]
    assert delays == sorted(delays) and delays[0] < delays[-1], delays  # backing off
    assert 0.3 <= delays[0] <= 0.7, delays
    # The first worker and three replacements; the last one handled the good messages.
    wait_until(lambda: len(supervised.every_worker_pid()) == 4, 5, "the fourth worker")
    assert len(app.marked("started", 1)) == 3  # the fourth delivery was parked unhandled
    properties, body = rabbit.wait_message(app.dead, timeout=5)
    headers = properties.headers or {}
    assert json.loads(body)["n"] == 1
    assert properties.message_id == "task-1"
    assert headers.get("x-parked-reason") == "worker_lost", headers
    assert "died" in str(headers.get("x-exception-message")), headers
    assert not supervised.exited
    supervised.send(signal.SIGTERM)
    assert supervised.wait_exit(15) == 0, supervised.stderr
    assert rabbit.count(app.queue) == 0


def test_a_handler_calling_sys_exit_gets_its_worker_restarted_and_the_message_parked(app, rabbit):
    supervised = app.start("--workers", "1", ready=1, APP_MAX_ATTEMPTS="2")
    app.publish(1, "exit")
    app.publish(2)

    app.wait_marked("done", 2, timeout=15)

    deaths = supervised.deaths()
    assert [how for _pid, how, _delay in deaths] == ["exited with code 1"] * 2, supervised.stderr
    assert "SystemExit" in supervised.stderr
    properties, _body = rabbit.wait_message(app.dead, timeout=5)
    assert (properties.headers or {}).get("x-parked-reason") == "worker_lost"
    assert not supervised.exited
    supervised.send(signal.SIGTERM)
    assert supervised.wait_exit(15) == 0, supervised.stderr


def test_a_replacement_that_cannot_start_is_retried_with_back_off_until_it_can(
    app, rabbit, amqp_url
):
    env = {"AMQP_LISTENER_QUEUE_TYPE": "classic"}  # quorum queues ignore exclusive consumers
    supervised = app.start("--workers", "1", ready=1, **env)
    # Two quick deaths: the next restart waits about 1s, time to take the queue away.
    for deaths in (1, 2):
        [victim] = supervised.worker_pids()[-1:]
        os.kill(victim, signal.SIGKILL)
        supervised.wait_log(f"worker pid={victim} died")
        if deaths == 1:
            supervised.wait_started(2)
    holder = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = holder.channel()
        wait_until(lambda: _consume_exclusively(channel, app.queue), 0.5, "an exclusive consumer")
        supervised.wait_log("could not start")
    finally:
        holder.close()
    supervised.wait_started(3)
    app.publish(1)

    app.wait_marked("done", 1)

    deaths = supervised.deaths()
    assert len(deaths) == 3, supervised.stderr
    assert "could not start" in deaths[2][1]
    assert "exclusive" in deaths[2][1]
    assert deaths[2][2] > deaths[1][2]  # the back-off kept growing
    assert not supervised.exited
    supervised.send(signal.SIGTERM)
    assert supervised.wait_exit(15) == 0, supervised.stderr


def _consume_exclusively(channel: Any, queue: str) -> bool:
    try:
        channel.basic_consume(queue, lambda *_: None, exclusive=True)
    except pika.exceptions.ChannelClosedByBroker:
        return False
    return True


# -- two workers sharing a queue ---------------------------------------------------------------


def test_two_workers_share_the_queue_and_handle_every_message_exactly_once(app, rabbit):
    supervised = app.start("--workers", "2", ready=2, APP_CONCURRENCY="2")
    workers = supervised.worker_pids()
    assert len(set(workers)) == 2
    assert supervised.pid not in workers
    total = 30
    for n in range(1, total + 1):
        app.publish(n, "sleep", seconds=0.05)

    wait_until(lambda: len(app.done_counts()) == total, 15, f"{total} messages done")

    counts = app.done_counts()
    lost = [n for n in range(1, total + 1) if counts[n] == 0]
    duplicated = [n for n, count in counts.items() if count > 1]
    assert lost == []
    assert duplicated == []
    handlers = {int(p.read_text()) for p in app.markers.glob("done-*")}
    assert handlers == set(workers)
    supervised.send(signal.SIGTERM)
    assert supervised.wait_exit(15) == 0, supervised.stderr
    assert supervised.deaths() == []
    assert rabbit.count(app.queue) == 0
    assert rabbit.count(app.dead) == 0


# -- signals -----------------------------------------------------------------------------------


def test_sigterm_mid_message_lets_it_finish_then_every_process_exits_0(app, rabbit):
    supervised = app.start("--workers", "2", "--grace", "15", ready=2)
    workers = supervised.worker_pids()
    app.publish(1, "wait")
    [holder] = app.wait_marked("started", 1)

    supervised.send(signal.SIGTERM)
    supervised.wait_log("waiting up to 15s for 1 in-flight message(s)")
    assert alive(holder)
    app.release(1)
    code = supervised.wait_exit(15)

    assert code == 0, supervised.stderr
    assert app.marked("done", 1) == [holder]
    assert "supervisor received SIGTERM: stopping 2 worker(s)" in supervised.stderr
    assert "2 worker(s) stopped cleanly" in supervised.stderr
    assert "did not finish" not in supervised.stderr
    assert "Traceback" not in supervised.stderr
    assert supervised.deaths() == []
    assert [pid for pid in [supervised.pid, *workers] if alive(pid)] == []
    assert rabbit.count(app.queue) == 0
    assert rabbit.count(app.dead) == 0


def test_ctrl_c_to_the_whole_process_group_drains_once_instead_of_stopping_at_once(app, rabbit):
    supervised = app.start("--workers", "2", "--grace", "15", ready=2, new_session=True)
    workers = supervised.worker_pids()
    app.publish(1, "wait")
    [holder] = app.wait_marked("started", 1)

    os.killpg(supervised.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    supervised.wait_log("waiting up to 15s for 1 in-flight message(s)")
    app.release(1)
    code = supervised.wait_exit(15)

    # Only the supervisor heard the terminal: each worker got one signal, from it.
    assert code == 0, supervised.stderr
    assert "second signal" not in supervised.stderr
    assert supervised.stderr.count("stopping (received SIGTERM)") == 2
    assert "stopping (received SIGINT)" not in supervised.stderr
    assert app.marked("done", 1) == [holder]
    assert [pid for pid in workers if alive(pid)] == []
    assert rabbit.count(app.queue) == 0


def test_a_second_sigterm_kills_the_workers_at_once_and_the_message_goes_back(app, rabbit):
    supervised = app.start("--workers", "2", "--grace", "30", ready=2)
    workers = supervised.worker_pids()
    app.publish(1, "wait")
    app.wait_marked("started", 1)
    supervised.send(signal.SIGTERM)
    supervised.wait_log("waiting up to 30s for 1 in-flight message(s)")

    sent = time.monotonic()
    supervised.send(signal.SIGTERM)
    code = supervised.wait_exit(10)

    assert code == 128 + signal.SIGTERM, supervised.stderr
    assert time.monotonic() - sent < 3
    assert "second signal (SIGTERM)" in supervised.stderr
    assert [pid for pid in workers if alive(pid)] == []
    properties, body = rabbit.wait_message(app.queue, timeout=5)
    assert json.loads(body)["n"] == 1
    assert delivery_count(properties) >= 1, properties.headers  # unacked, not handed back
    assert app.marked("done", 1) == []
    assert rabbit.count(app.dead) == 0


def test_sigquit_kills_the_workers_at_once_and_the_message_goes_back(app, rabbit):
    supervised = app.start("--workers", "2", ready=2)
    workers = supervised.worker_pids()
    app.publish(1, "wait")
    app.wait_marked("started", 1)

    sent = time.monotonic()
    supervised.send(signal.SIGQUIT)
    code = supervised.wait_exit(10)

    assert code == 128 + signal.SIGQUIT, supervised.stderr
    assert time.monotonic() - sent < 3
    assert [pid for pid in workers if alive(pid)] == []
    _properties, body = rabbit.wait_message(app.queue, timeout=5)
    assert json.loads(body)["n"] == 1
    assert app.marked("done", 1) == []


def test_killing_the_supervisor_takes_its_workers_down_and_the_message_goes_back(app, rabbit):
    supervised = app.start("--workers", "2", ready=2)
    workers = supervised.worker_pids()
    app.publish(1, "wait")
    app.wait_marked("started", 1)

    supervised.process.kill()
    assert supervised.wait_exit(10) == -signal.SIGKILL

    supervised.wait_all_gone(workers, timeout=3)
    properties, body = rabbit.wait_message(app.queue, timeout=5)
    assert json.loads(body)["n"] == 1
    # 1, or 2 when the other dying worker took the redelivery in its last milliseconds.
    assert delivery_count(properties) >= 1, properties.headers
    assert app.marked("done", 1) == []


# -- hung handlers ------------------------------------------------------------------------------


def test_a_worker_with_a_hung_sync_handler_is_recycled_and_the_message_parked_once(app, rabbit):
    supervised = app.start("--workers", "1", ready=1, APP_TIMEOUT="0.5", APP_MAX_ATTEMPTS="2")
    first = supervised.worker_pids()[0]
    try:
        app.publish(1, "wait")  # never released while the run lasts: a hung call
        # Attempt 1 times out, is retried, and its worker (holding the stuck thread) is
        # replaced; the replacement's attempt 2 hangs too and parks the message as a time-out.
        properties, _body = rabbit.wait_message(app.dead, timeout=20)
        supervised.wait_log("recycled after", count=2)
        app.publish(2)
        app.wait_marked("done", 2)
    finally:
        app.release(1)

    headers = properties.headers or {}
    assert headers["x-parked-reason"] == "timeout"
    assert headers["x-attempts"] == 2
    assert app.marked("started", 1) and len(app.marked("started", 1)) == 2
    assert supervised.deaths() == []  # a recycle is not a death: no back-off
    assert first not in supervised.worker_pids()[1:]
    supervised.send(signal.SIGTERM)
    assert supervised.wait_exit(20) == 0
    assert rabbit.count(app.dead) == 0  # parked exactly once (taken above)


def test_sigterm_to_every_process_at_once_still_drains(app, rabbit):
    # systemd's default KillMode and `pkill` signal every process of the service: a worker
    # then hears SIGTERM twice (directly and from its supervisor) and must still drain.
    supervised = app.start("--workers", "1", ready=1)
    (worker,) = supervised.worker_pids()
    app.publish(1, "sleep", seconds=1.0)
    app.wait_marked("started", 1)
    os.kill(worker, signal.SIGTERM)
    supervised.send(signal.SIGTERM)

    assert supervised.wait_exit(20) == 0, supervised.stderr
    assert app.marked("done", 1) == [worker]  # finished, not cut short
    assert rabbit.count(app.queue) == 0
    assert rabbit.count(app.dead) == 0
