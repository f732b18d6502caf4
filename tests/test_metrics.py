"""Prometheus metrics: the `Metrics` middleware in-process, and `run --metrics-port` as processes.

The in-process tests host a listener in a `Worker` with a `Metrics` middleware of their own
(its private registry is read directly). The process tests start the console script with
`--workers 2 --metrics-port 0` against tests/apps/fleet.py, read the port the supervisor
logged, and scrape the endpoint over HTTP while messages flow and workers die.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from support.waiting import eventually, wait_until

import listener
from listener import Listener
from listener.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
EXECUTABLE = os.path.join(os.path.dirname(sys.executable), "amqp-listener")
APP = "tests.apps.fleet"
STARTED = re.compile(r"worker \d+ of \d+ started: pid=(\d+)")
ENDPOINT = re.compile(r"metrics endpoint pid=(\d+) serving http://[^:]+:(\d+)/metrics")
#: Something that must never reach a scrape: in a message body, and as the broker password.
SECRET = "hunter2-do-not-export"


class Item(BaseModel):
    n: int


class Reader:
    """Reads one `Metrics` registry for one listener: `reader("handled")` and friends."""

    def __init__(self, metrics: Metrics, cls: type[Listener]) -> None:
        self.metrics = metrics
        self.name = cls.__name__

    def __call__(self, what: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(
            f"amqp_listener_{what}", {"listener": self.name, **labels}
        )
        return 0.0 if value is None else value

    def counter(self, what: str, **labels: str) -> float:
        return self(f"messages_{what}_total", **labels)

    def durations(self, outcome: str) -> float:
        return self("handler_duration_seconds_count", outcome=outcome)

    @property
    def in_flight(self) -> float:
        return self("messages_in_flight")


def publish(rabbit: Any, exchange: str, body: bytes, message_id: str) -> None:
    rabbit.publish(
        exchange,
        "key",
        body,
        content_type="application/json",
        delivery_mode=2,
        message_id=message_id,
    )


# -- the middleware, in-process: failure paths first ----------------------------------------------


async def test_a_handler_that_always_raises_counts_each_failure_a_retry_and_one_park(
    unique, rabbit, run_worker
):
    class Broken(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.broken"
        max_attempts = 2
        retry_delays = (0.1,)

        def handle(self, message: Item) -> None:
            raise ValueError("broken")

    metrics = Metrics()
    read = Reader(metrics, Broken)
    async with run_worker(Broken, middleware=[metrics]):
        publish(rabbit, unique, b'{"n": 1}', "m-1")
        await eventually(lambda: read.counter("parked", reason="failed") == 1)

    assert read.counter("received") == 2  # the first delivery and the retried copy
    assert read.counter("failed") == 2
    assert read.counter("retried") == 1
    assert read.counter("handled") == 0
    assert read.counter("timed_out") == 0
    assert read.durations("retried") == 1
    assert read.durations("parked") == 1
    assert read.in_flight == 0


async def test_an_attempt_that_times_out_counts_as_timed_out_failed_and_parked_for_timeout(
    unique, rabbit, run_worker
):
    class Slow(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.slow"
        max_attempts = 1
        timeout = 0.3

        async def handle(self, message: Item) -> None:
            await asyncio.sleep(30)

    metrics = Metrics()
    read = Reader(metrics, Slow)
    async with run_worker(Slow, middleware=[metrics]):
        publish(rabbit, unique, b'{"n": 1}', "m-1")
        await eventually(lambda: read.counter("parked", reason="timeout") == 1)

    assert read.counter("timed_out") == 1
    assert read.counter("failed") == 1
    assert read.counter("retried") == 0
    assert read.counter("handled") == 0
    assert read.in_flight == 0
    # The attempt lasted at least its timeout: it is in the histogram's sum as such.
    assert read("handler_duration_seconds_sum", outcome="parked") >= 0.3


async def test_parked_messages_are_counted_by_reason(unique, rabbit, run_worker):
    class Picky(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.picky"

        def handle(self, message: Item) -> None:
            if message.n == 1:
                raise listener.Reject("not for us")

    metrics = Metrics()
    read = Reader(metrics, Picky)
    async with run_worker(Picky, middleware=[metrics]):
        publish(rabbit, unique, b'{"n": 1}', "m-reject")
        publish(rabbit, unique, b'{"n": "one"}', "m-invalid")
        publish(rabbit, unique, b"{not json", "m-garbage")
        publish(rabbit, unique, b'{"n": 2}', "m-fine")
        await eventually(lambda: read.counter("received") == 4 and read.in_flight == 0)

    assert read.counter("parked", reason="rejected") == 1
    assert read.counter("parked", reason="validation_error") == 1
    assert read.counter("parked", reason="decode_error") == 1
    assert read.counter("failed") == 3
    assert read.counter("retried") == 0  # none of these is retried
    assert read.counter("handled") == 1
    assert read.durations("parked") == 3


async def test_a_message_handed_back_at_stop_leaves_nothing_in_flight(
    unique, rabbit, run_worker, settings
):
    started = asyncio.Event()

    class Stuck(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.stuck"

        async def handle(self, message: Item) -> None:
            started.set()
            await asyncio.sleep(30)

    metrics = Metrics()
    read = Reader(metrics, Stuck)
    quick = settings.model_copy(update={"grace_period": 0.2})
    async with run_worker(Stuck, middleware=[metrics], worker_settings=quick):
        publish(rabbit, unique, b'{"n": 1}', "m-1")
        await asyncio.wait_for(started.wait(), 10)
        assert read.in_flight == 1

    assert read.in_flight == 0
    assert read.durations("returned") == 1
    assert read.counter("failed") == 0  # a stop is not the handler's failure
    assert read.counter("handled") == 0
    assert rabbit.count(Stuck.queue) == 1  # handed back, not lost


async def test_handled_messages_are_counted_and_in_flight_follows_the_handler(
    unique, rabbit, run_worker
):
    release = asyncio.Event()

    class Fine(Listener):
        subscribes_to = f"{unique}.key"
        queue = f"{unique}.fine"
        concurrency = 4

        async def handle(self, message: Item) -> None:
            if message.n == 0:
                await release.wait()

    metrics = Metrics()
    read = Reader(metrics, Fine)
    async with run_worker(Fine, middleware=[metrics]):
        # The series exist from the start, at 0, before any message.
        assert (
            metrics.registry.get_sample_value(
                "amqp_listener_messages_handled_total", {"listener": "Fine"}
            )
            == 0
        )
        publish(rabbit, unique, b'{"n": 0}', "m-0")
        await eventually(lambda: read.in_flight == 1)
        for n in range(1, 6):
            publish(rabbit, unique, json.dumps({"n": n}).encode(), f"m-{n}")
        await eventually(lambda: read.counter("handled") == 5)
        assert read.in_flight == 1
        release.set()
        await eventually(lambda: read.counter("handled") == 6)

    assert read.counter("received") == 6
    assert read.counter("failed") == 0
    assert read.in_flight == 0
    assert read.durations("handled") == 6


def test_metrics_live_in_a_private_registry_so_two_instances_never_clash():
    from prometheus_client import REGISTRY

    first, second = Metrics(), Metrics()

    assert first.registry is not second.registry
    names = {metric.name for metric in REGISTRY.collect()}
    assert not any(name.startswith("amqp_listener_") for name in names)
    assert isinstance(first, listener.Middleware)


# -- run --metrics-port: real processes -----------------------------------------------------------


class Run:
    """One `amqp-listener run tests.apps.fleet --metrics-port 0 ...` process and its app."""

    def __init__(self, unique: str, amqp_url: str, tmp_path: Path, rabbit: Any) -> None:
        self.exchange = unique
        self.queue = f"{unique}.fleet"
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        self.tmp = tmp_path / "tmp"  # TMPDIR of the run: where its metrics directory goes
        self.tmp.mkdir()
        self.err = tmp_path / "run.err"
        self.amqp_url = amqp_url
        self.rabbit = rabbit
        self.process: subprocess.Popen[bytes] | None = None
        rabbit.exchanges.add(self.exchange)
        rabbit.queues.update({self.queue, f"{self.queue}.dead", f"{self.queue}.retry.100ms"})
        rabbit.track_delay_entry(self.queue, f"{self.exchange}.work")

    def start(self, *args: str, **env: str) -> None:
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(("AMQP_LISTENER_", "AMQP_URL"))
        }
        environment.update(
            AMQP_URL=self.amqp_url,
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
            TMPDIR=str(self.tmp),
            APP_EXCHANGE=self.exchange,
            APP_QUEUE=self.queue,
            APP_MARKER_DIR=str(self.markers),
            **env,
        )
        with self.err.open("wb") as err:
            self.process = subprocess.Popen(
                [EXECUTABLE, "run", APP, *args],
                cwd=REPO,
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_log(self, pattern: re.Pattern[str] | str, count: int = 1) -> list[Any]:
        """Wait until `pattern` matched `count` times on stderr; the matches."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def seen() -> list[Any]:
            found = regex.findall(self.stderr)
            if len(found) >= count:
                return found
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"the run exited before {regex.pattern!r}:\n{self.stderr}")
            return []

        return wait_until(seen, 15, f"{regex.pattern!r} x{count} on stderr")

    def endpoint(self) -> tuple[int, int]:
        """(pid, port) of the serving process the supervisor logged last."""
        pid, port = self.wait_log(ENDPOINT)[-1]
        return int(pid), int(port)

    def publish(self, n: int, action: str = "ok", **extra: Any) -> None:
        body = json.dumps({"n": n, "action": action, **extra}).encode()
        self.rabbit.publish(
            self.exchange,
            "work",
            body,
            content_type="application/json",
            delivery_mode=2,
            message_id=f"task-{n}",
        )

    def marked(self, event: str, n: int) -> list[int]:
        return sorted(int(p.read_text()) for p in self.markers.glob(f"{event}-{n}-*"))

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(20)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # its children die with it (PDEATHSIG)
            self.process.wait(10)


@pytest.fixture
def run(unique: str, amqp_url: str, tmp_path: Path, rabbit: Any) -> Iterator[Run]:
    started = Run(unique, amqp_url, tmp_path, rabbit)
    try:
        yield started
    finally:
        started.kill()  # before `rabbit` deletes the queues under it


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return str(response.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a scrape, 0 when it is absent. Labels must match exactly."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        rest = series[len(name) :]
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest)) if rest.startswith("{") else {}
        if (rest == "" or rest.startswith("{")) and found == labels:
            return float(value)
    return 0.0


def fleet(text: str, what: str, **labels: str) -> float:
    return sample(text, f"amqp_listener_{what}", listener="Fleet", **labels)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.slow
def test_a_port_already_in_use_exits_2_with_one_line_before_touching_the_broker(run):
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        started = time.monotonic()
        # An unreachable broker: reaching it would be exit 1, after retries.
        run.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2F"
        run.start("--workers", "2", "--metrics-port", str(port))
        assert run.process is not None
        code = run.process.wait(15)

    assert code == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("amqp-listener: error: cannot serve metrics on 0.0.0.0:")
    assert str(port) in lines[0]
    assert time.monotonic() - started < 10
    assert list(run.tmp.iterdir()) == []  # no metrics directory left behind


@pytest.mark.slow
def test_the_endpoint_adds_up_every_worker_and_survives_a_killed_one(run, amqp_url):
    password_url = amqp_url  # the broker's password must not appear either
    run.start("--workers", "2", "--metrics-port", "0", APP_MAX_ATTEMPTS="3")
    workers = {int(pid) for pid in run.wait_log(STARTED, count=2)}
    server_pid, port = run.endpoint()
    assert server_pid not in workers

    before = scrape(port)
    assert fleet(before, "messages_received_total") == 0  # the series exist before messages
    assert "amqp_listener_messages_handled_total{" in before

    for n in range(1, 7):
        run.publish(n, "sleep", seconds=0.15)
    run.publish(7, "bogus", secret=SECRET)  # fails the model: parked, validation_error
    text = wait_until(
        lambda: (
            (t := scrape(port))
            and fleet(t, "messages_handled_total") == 6
            and fleet(t, "messages_parked_total", reason="validation_error") == 1
            # after_handle (failed, in_flight, duration) runs a moment after on_park
            and fleet(t, "messages_failed_total") == 1
            and fleet(t, "messages_in_flight") == 0
            and t
        ),
        15,
        "6 handled and 1 parked in the scrape",
    )
    handlers = {pid for n in range(1, 7) for pid in run.marked("done", n)}
    assert handlers == workers, "both workers handled messages: the sum spans both"
    assert fleet(text, "messages_received_total") == 7
    assert fleet(text, "messages_failed_total") == 1
    assert fleet(text, "messages_in_flight") == 0
    assert fleet(text, "handler_duration_seconds_count", outcome="handled") == 6
    assert fleet(text, "handler_duration_seconds_bucket", le="0.1", outcome="handled") == 0
    assert fleet(text, "handler_duration_seconds_bucket", le="+Inf", outcome="handled") == 6
    assert SECRET not in text
    assert "bogus" not in text
    assert "guest" not in text and "amqp://" not in text
    assert password_url not in text

    # A worker killed mid-message: its counters stay counted, its in-flight gauge goes.
    run.publish(8, "wait")
    [victim] = wait_until(lambda: run.marked("started", 8), 10, "message 8 started")
    wait_until(lambda: fleet(scrape(port), "messages_in_flight") == 1, 10, "1 in flight")
    os.kill(victim, signal.SIGKILL)
    run.wait_log(rf"worker pid={victim} died: killed by SIGKILL")
    wait_until(lambda: len(run.marked("started", 8)) == 2, 10, "message 8 redelivered")

    after = scrape(port)
    assert fleet(after, "messages_handled_total") == 6
    assert fleet(after, "messages_parked_total", reason="validation_error") == 1
    assert fleet(after, "messages_in_flight") == 1  # the redelivery only, not the dead one's

    (run.markers / "release-8").write_text("go")
    last = wait_until(
        lambda: (t := scrape(port)) and fleet(t, "messages_handled_total") == 7 and t,
        10,
        "message 8 handled",
    )
    assert fleet(last, "messages_in_flight") == 0
    assert fleet(last, "messages_received_total") == 9  # 8 messages, one delivered twice

    assert run.stop() == 0, run.stderr
    assert not alive(server_pid)
    assert list(run.tmp.iterdir()) == []  # the metrics directory was removed
    with pytest.raises(urllib.error.URLError):
        scrape(port)


@pytest.mark.slow
def test_a_killed_endpoint_process_is_restarted_on_the_same_port_with_the_same_counts(run):
    run.start("--metrics-port", "0")
    run.wait_log(STARTED)
    server_pid, port = run.endpoint()
    for n in range(1, 4):
        run.publish(n)
    wait_until(
        lambda: fleet(scrape(port), "messages_handled_total") == 3, 10, "3 handled in the scrape"
    )

    os.kill(server_pid, signal.SIGKILL)

    run.wait_log(rf"metrics endpoint pid={server_pid} died: killed by SIGKILL")

    def answers() -> str | None:
        try:
            return scrape(port)
        except (urllib.error.URLError, ConnectionError):
            return None

    text = wait_until(answers, 10, "the endpoint to answer again")
    assert fleet(text, "messages_handled_total") == 3
    assert run.process is not None and run.process.poll() is None
    assert run.stop() == 0, run.stderr
