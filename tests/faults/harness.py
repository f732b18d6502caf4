"""Jepsen-style bookkeeping for the fault suite: publish, inject, recover, drain, classify.

A test publishes messages with unique ids through the framework's confirmed publisher and
writes down what each call said: **confirmed** (it returned) or **unknown** (it raised a
PublishError: the message may or may not be queued). Workers run as real
`amqp-listener run faults.app` processes and journal every handling (faults/app.py).
After the fault and the recovery the test drains, then classifies:

    lost        confirmed, but never handled nor parked: must be 0
    duplicates  handlings beyond the first, summed over messages: counted and bounded
    unknown     publishes that raised; `unknown_arrived` of them were handled anyway
    parked      in `<queue>.dead` (not lost, but a fault should not park healthy messages)
    bad         bodies that reached a handler incomplete or altered: must be 0

Each verdict is recorded as test properties, printed, and collected for the summary table
printed at the end of the run (see conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pika
import pika.exceptions
from support.runner_process import EXECUTABLE, RunnerProcess, clean_env

from faults.node import RabbitNode, pid_alive
from faults.payload import item
from listener import codec
from listener.errors import PublishError
from listener.publisher import Publisher
from listener.settings import Settings

__all__ = ["Fault", "Runner", "Verdict", "wait_until"]

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"  # where `faults` and `support` are importable, as under pytest
APP = "faults.app"
DIED = re.compile(r"worker pid=(\d+) died: (.+?) after")

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, step: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)


# -- runner processes -----------------------------------------------------------------------------


class Runner(RunnerProcess):
    """One `amqp-listener run faults.app --workers N`; its output goes to files."""

    shown = 3000  # the end of stderr in failure messages: a fault run logs a lot

    def live_workers(self) -> list[int]:
        return [pid for pid in self.worker_pids() if pid_alive(pid)]

    def deaths(self) -> list[tuple[int, str]]:
        return [(int(pid), how) for pid, how in DIED.findall(self.stderr)]

    def signal(self, signum: int) -> None:
        """Send signal `signum` to the supervisor (`send`, by the name the fault tests use)."""
        self.send(signum)


# -- the verdict ----------------------------------------------------------------------------------


@dataclass
class Verdict:
    fault: str
    confirmed: int
    lost: int
    duplicates: int
    unknown: int
    unknown_arrived: int
    retried: int
    parked: int
    bad: int
    recovery_s: float | None
    notes: str = ""
    lost_ids: list[str] = field(default_factory=list)

    def assert_nothing_lost(self) -> None:
        """Fail unless every confirmed message arrived, whole."""
        assert self.lost == 0, (
            f"{self.lost} confirmed message(s) were never handled nor parked: "
            f"{describe(self.lost_ids)}"
        )
        assert self.bad == 0, "a handler saw an incomplete or altered body"

    def line(self) -> str:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}s"
        return (
            f"{self.fault}: confirmed={self.confirmed} lost={self.lost} "
            f"duplicates={self.duplicates} unknown={self.unknown} "
            f"(arrived {self.unknown_arrived}) retried={self.retried} parked={self.parked} "
            f"bad={self.bad} "
            f"recovery={recovery}{' ' + self.notes if self.notes else ''}"
        )


#: Every verdict of this run, for the summary table (conftest.py prints it).
VERDICTS: list[Verdict] = []


# -- one test's fault run -------------------------------------------------------------------------


class Fault:
    """A test's names, publishers, runners and ledger against the project-owned node."""

    def __init__(
        self, node: RabbitNode, unique: str, tmp: Path, record: Callable[[str, object], None]
    ) -> None:
        self.node = node
        self.exchange = unique
        self.queue = f"{unique}.target"
        self.dead = f"{self.queue}.dead"
        self.address = f"{self.exchange}.work"
        self.events_dir = tmp / "events"
        self.events_dir.mkdir()
        self.tmp = tmp
        self._record = record
        self.confirmed: dict[str, float] = {}  # id -> when notify returned (monotonic)
        self.unknown: dict[str, str] = {}  # id -> the PublishError subclass it raised
        self.failed_at: dict[str, float] = {}  # id -> when that publish raised (monotonic)
        self.parked: Counter[str] = Counter()
        self.runners: list[Runner] = []
        self.publishers: list[Publisher] = []
        self._lock = threading.Lock()
        self._serial = 0

    # -- publishing --------------------------------------------------------------------------

    def publisher(self, url: str | None = None, **settings: Any) -> Publisher:
        """A confirmed publisher (the one behind notify()) on the node or on `url`."""
        options = {"confirm_timeout": 5.0, "connect_attempts": 1, **settings}
        publisher = Publisher(Settings(url=url or self.node.url, **options))
        self.publishers.append(publisher)
        return publisher

    def next_id(self, prefix: str) -> str:
        with self._lock:
            self._serial += 1
            return f"{prefix}-{self._serial}"

    def send(self, publisher: Publisher, message_id: str, **fields: Any) -> bool:
        """Publish one message; write down whether it was confirmed. Other errors propagate."""
        body = codec.encode(item(message_id, **fields))
        exchange, key = self.address.split(".", 1)
        return self.attempt(message_id, lambda: publisher.publish_body(exchange, key, body))

    def attempt(self, message_id: str, publish: Callable[[], object]) -> bool:
        """Run one publish of message `message_id` (a `notify()` call, say) and write down
        whether it was confirmed. Errors other than PublishError propagate."""
        try:
            publish()
        except PublishError as exc:
            with self._lock:
                self.unknown[message_id] = type(exc).__name__
                self.failed_at[message_id] = time.monotonic()
            return False
        with self._lock:
            self.confirmed[message_id] = time.monotonic()
        return True

    def publish(
        self,
        count: int,
        *,
        publisher: Publisher | None = None,
        prefix: str = "m",
        pause_after_error: float = 0.2,
        interval: float = 0.0,
        fail_every: int = 0,
        timeout: float = 60.0,
        stop: threading.Event | None = None,
        **fields: Any,
    ) -> int:
        """Publish until `count` were confirmed, `interval` seconds apart (a failed call is
        written down, not retried with the same id); returns how many calls raised.

        With `fail_every=k`, every k-th message raises on its first attempt, so retries (a
        confirmed copy to the delay queue, then the ack) happen while the fault strikes."""
        publisher = publisher or self.publisher()
        deadline = time.monotonic() + timeout
        confirmed = errors = 0
        while confirmed < count and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                break
            message_id = self.next_id(prefix)
            serial = int(message_id.rsplit("-", 1)[1])
            fail_first = bool(fail_every) and serial % fail_every == 0
            if self.send(publisher, message_id, fail_first=fail_first, **fields):
                confirmed += 1
                if interval:
                    time.sleep(interval)
            else:
                errors += 1
                time.sleep(pause_after_error)
        return errors

    @contextlib.contextmanager
    def publishing(self, count: int, **options: Any) -> Iterator[threading.Thread]:
        """Publish `count` confirmed messages in a background thread while the body runs;
        waits (bounded) for the thread at the end and re-raises what it raised."""
        failure: list[BaseException] = []
        stop = threading.Event()

        def work() -> None:
            try:
                self.publish(count, stop=stop, **options)
            except BaseException as exc:  # re-raised in the test's thread
                failure.append(exc)

        thread = threading.Thread(target=work, name="fault-publisher", daemon=True)
        thread.start()
        try:
            yield thread
        except BaseException:
            stop.set()  # the test failed: do not wait for the whole count
            thread.join(15)
            raise
        thread.join(options.get("timeout", 60.0) + 10)
        stop.set()
        assert not thread.is_alive(), "the publishing thread did not finish"
        if failure:
            raise failure[0]

    def confirmed_ids(self) -> set[str]:
        """The ids confirmed so far (a copy: a publishing thread may be adding to them)."""
        with self._lock:
            return set(self.confirmed)

    def wait_confirmed(self, count: int, timeout: float = 30.0) -> None:
        wait_until(lambda: len(self.confirmed) >= count, timeout, f"{count} confirmed publishes")

    # -- runners -----------------------------------------------------------------------------

    def declare(self) -> None:
        """`amqp-listener declare faults.app`: the topology exists before anything runs."""
        done = subprocess.run(
            [EXECUTABLE, "declare", APP],
            cwd=REPO,
            env=self.runner_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr

    def runner_env(self, url: str | None = None, **extra: str) -> dict[str, str]:
        env = clean_env(TESTS)
        env.update(
            AMQP_URL=url or self.node.url,
            AMQP_LISTENER_CONNECT_ATTEMPTS="10",
            FAULT_EXCHANGE=self.exchange,
            FAULT_QUEUE=self.queue,
            FAULT_EVENTS_DIR=str(self.events_dir),
        )
        env.update(extra)
        return env

    def start_runner(
        self, workers: int = 2, *, url: str | None = None, ready: bool = True, **env: str
    ) -> Runner:
        """Start `amqp-listener run faults.app --workers N`; wait until all consume."""
        index = len(self.runners)
        runner = Runner(
            [EXECUTABLE, "run", APP, "--workers", str(workers)],
            self.runner_env(url, **env),
            self.tmp / f"runner-{index}.out",
            self.tmp / f"runner-{index}.err",
        )
        self.runners.append(runner)
        if ready:
            runner.wait_started(workers, timeout=20)
        return runner

    # -- what happened -----------------------------------------------------------------------

    def events(self) -> dict[str, Counter[str]]:
        """Counts per event kind (`start`, `done`, `bad`) and message id, over all workers."""
        counts: dict[str, Counter[str]] = {
            kind: Counter() for kind in ("start", "done", "bad", "fail")
        }
        for journal in self.events_dir.glob("events-*.log"):
            for line in journal.read_text().splitlines():
                kind, _, message_id = line.partition(" ")
                counts.setdefault(kind, Counter())[message_id] += 1
        return counts

    def handled(self) -> Counter[str]:
        return self.events()["done"]

    def handled_count(self) -> int:
        return len(self.handled())

    def _broker(self) -> pika.BlockingConnection:
        params = pika.URLParameters(self.node.url)
        params.socket_timeout = 5
        return pika.BlockingConnection(params)

    def consumers(self) -> int:
        """Consumers on the listener's queue now (0 when the node does not answer)."""
        try:
            connection = self._broker()
        except (pika.exceptions.AMQPError, OSError):
            return 0
        try:
            declared = connection.channel().queue_declare(self.queue, passive=True)
            return int(declared.method.consumer_count)
        except pika.exceptions.AMQPError:
            return 0
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def drain_parked(self) -> None:
        """Take every parked message out of `<queue>.dead` into `self.parked`."""
        try:
            connection = self._broker()
        except (pika.exceptions.AMQPError, OSError):
            return
        try:
            channel = connection.channel()
            while True:
                method, _props, body = channel.basic_get(self.dead, auto_ack=True)
                if method is None:
                    break
                try:
                    self.parked[str(json.loads(body)["id"])] += 1
                except (ValueError, KeyError, TypeError):
                    self.parked["<undecodable>"] += 1
        except pika.exceptions.AMQPError:
            pass
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def outstanding(self) -> set[str]:
        """Confirmed ids neither handled nor parked yet."""
        return self.confirmed_ids() - set(self.handled()) - set(self.parked)

    def wait_settled(self, timeout: float) -> float:
        """Wait (bounded) until every confirmed message was handled or parked; returns the
        monotonic time it happened. On time-out it returns, and the verdict counts the rest
        as lost."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.outstanding():
                return time.monotonic()
            self.drain_parked()
            if not self.outstanding():
                return time.monotonic()
            if time.monotonic() > deadline:
                return time.monotonic()
            time.sleep(0.1)

    def verdict(
        self, fault: str, *, recovery_s: float | None, notes: str = "", settle: float = 0.5
    ) -> Verdict:
        """Classify, record (test properties, stdout, the summary table) and return."""
        time.sleep(settle)  # late redeliveries of the last messages show up as duplicates
        self.drain_parked()
        handled = self.handled()
        bad = self.events()["bad"]
        lost = sorted(self.outstanding())
        with self._lock:
            unknown = dict(self.unknown)
            confirmed = len(self.confirmed)
        result = Verdict(
            fault=fault,
            confirmed=confirmed,
            lost=len(lost),
            duplicates=sum(count - 1 for count in handled.values() if count > 1),
            unknown=len(unknown),
            unknown_arrived=sum(1 for mid in unknown if mid in handled or mid in self.parked),
            retried=len(self.events()["fail"]),
            parked=sum(self.parked.values()),
            bad=sum(bad.values()),
            recovery_s=recovery_s,
            notes=notes,
            lost_ids=lost[:20],
        )
        for name in ("confirmed", "lost", "duplicates", "unknown", "parked", "bad"):
            self._record(name, getattr(result, name))
        self._record("recovery_s", recovery_s)
        print(result.line())
        VERDICTS.append(result)
        return result

    # -- cleanup -----------------------------------------------------------------------------

    def close(self) -> None:
        for runner in self.runners:
            runner.kill()
        for publisher in self.publishers:
            with contextlib.suppress(Exception):
                publisher.close()
        with contextlib.suppress(Exception):
            connection = self._broker()
            channel = connection.channel()
            for queue in (self.queue, self.dead, f"{self.queue}.retry.100ms"):
                with contextlib.suppress(pika.exceptions.AMQPError):
                    channel.queue_delete(queue)
                if channel.is_closed:
                    channel = connection.channel()
            with contextlib.suppress(pika.exceptions.AMQPError):
                channel.exchange_delete(self.exchange)
            connection.close()


def describe(ids: Iterable[str], limit: int = 10) -> str:
    ids = list(ids)
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more
