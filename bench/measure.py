"""How one run of a case is measured, on fresh queues, in a fresh process.

* **consume**: pre-fill a fresh queue (the framework's quorum topology) with N persistent
  messages, start the consumer, and time from the first handler call to the last (across
  worker processes, on CLOCK_MONOTONIC). Checked: exactly N calls, and once the consumer
  has stopped, the queue and its dead-letter queue empty (an unacked message would be back
  in the queue). Peak RSS (VmHWM) of every process that handled messages, read before the
  stop.
* **peers** (`bench.peers`): the same, except that a peer with a message format of its own
  pre-fills with its own client, and one with queues of its own declares them itself (the
  parent then only deletes them); the dead-letter queue checked empty is the peer's.
* **serial** / **batch**: the publisher times its own loop after one untimed warm-up
  message; checked: the queue holds every message afterwards.
* **latency**: start the consumer on an empty queue, publish probes at a steady rate
  (each stamped with `time.monotonic()` just before it goes), and take p50 and p99 of the
  handler's delays. Checked like consume.

Every wait is bounded by the case's deadline; past it the process group is killed and the
run raises TimeoutError. Queues and exchanges are deleted whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika.exceptions

from bench.broker import Broker
from bench.cases import Case
from bench.ledgers import Ledgers
from bench.names import Target, new_token, target
from bench.peers import PEERS
from bench.procs import ChildFailed, cli, peak_rss_kib, running, wait_count
from bench.profiling import summarize
from bench.recorder import ENV_DIR, ENV_EXPECT, ENV_PROFILE, read_samples, read_stats
from bench.wire import item

__all__ = ["Plan", "RunFailed", "Runner"]

#: How long a stopped consumer's queue must then stay empty: the broker returns the
#: unacked messages of a closed channel asynchronously.
_SETTLED = 0.3
#: How long the broker may take to drop the consumer of an exited process.
_CONSUMER_GONE = 5.0


class RunFailed(Exception):
    """A run could not be measured or did not check out (a count, a leftover message)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """The parameters of a bench run."""

    url: str
    n: int
    prefetch: int
    serial_n: int
    window: int
    latency_rate: float
    latency_n: int


class Runner:
    """Measures runs of cases on one broker, in subprocesses, under `workdir`."""

    def __init__(self, plan: Plan, broker: Broker, workdir: Path) -> None:
        self.plan = plan
        self.broker = broker
        self.workdir = workdir
        #: What every run so far declared, in order: its exchange and its queues.
        self.declared: list[dict[str, Any]] = []
        #: The job ledger's databases, for the cases that turn it on.
        self.ledgers = Ledgers()

    def run(self, case: Case, deadline: float, *, profile: bool = False) -> dict[str, Any]:
        """Measure `case` once; the numbers of the run.

        Raises:
            TimeoutError: past `deadline`.
            RunFailed: the run failed or did not check out.
        """
        try:
            if case.group == "consume":
                return self._consume(case, deadline, profile=profile)
            if case.group == "latency":
                return self._latency(case, deadline)
            count = self.plan.serial_n if case.group == "serial" else self.plan.n
            return self._publish(case, count, deadline)
        except ChildFailed as exc:
            raise RunFailed(str(exc)) from exc
        except pika.exceptions.AMQPError as exc:
            raise RunFailed(f"the broker refused: {exc!r}") from exc

    # -- the three kinds of run --------------------------------------------------------------

    def _consume(self, case: Case, deadline: float, *, profile: bool) -> dict[str, Any]:
        n = self.plan.n
        with self._fresh(case) as (where, scratch):
            if case.peer and PEERS[case.peer].own_format:
                self._fill(case, where, scratch, deadline)
            else:
                self.broker.prefill(
                    where.exchange, where.routing_key, n, item, where.queue, _left(deadline)
                )
            env = self._env(where, scratch, case, expect=n if profile else 0, profile=profile)
            with running(self._argv(case, where), env, scratch / "output.log") as child:
                stats = wait_count(scratch, n, deadline, child)
                rss = {s["pid"]: peak_rss_kib(s["pid"]) for s in stats}
            stats = self._check_consumed(case, where, scratch, n)
            first = min(s["first"] for s in stats)
            last = max(s["last"] for s in stats)
            result: dict[str, Any] = {
                "messages": n,
                "handled": sum(s["count"] for s in stats),
                "seconds": last - first,
                "rate": (n - 1) / (last - first) if last > first else math.inf,
                "per_process": {str(s["pid"]): s["count"] for s in stats},
                "rss_kib": [kib for kib in rss.values() if kib is not None],
                "loop": sorted({s["loop"] for s in stats}),
            }
            if profile:  # read now: the scratch directory goes with the run
                dumps = sorted(scratch.glob("profile-*.prof"))
                if not dumps:
                    raise RunFailed("the consumer wrote no profile")
                result["profile"] = summarize(dumps, n - 1)
            return result

    def _publish(self, case: Case, count: int, deadline: float) -> dict[str, Any]:
        with self._fresh(case) as (where, scratch):
            out = scratch / "result.json"
            argv = self._argv(case, where, count=count, out=out)
            with running(argv, self._env(where, scratch, case), scratch / "output.log") as child:
                if child.wait(deadline) != 0 or not out.exists():
                    raise child.failed("the publisher failed")
            result = json.loads(out.read_text())
            # The warm-up message is in the queue too; delayed ones come back to it a second
            # after they were sent.
            queue = where.queue
            try:
                self.broker.wait_messages(queue, count + 1, min(15.0, _left(deadline)))
            except TimeoutError as exc:
                raise RunFailed(f"after publishing: {exc}") from None
            return {
                "messages": count,
                "in_queue": self.broker.counts(queue)[0],
                "seconds": result["seconds"],
                "rate": count / result["seconds"],
            }

    def _latency(self, case: Case, deadline: float) -> dict[str, Any]:
        count, rate = self.plan.latency_n, self.plan.latency_rate
        with self._fresh(case) as (where, scratch):
            argv, env = self._argv(case, where), self._env(where, scratch, case)
            with running(argv, env, scratch / "output.log") as child:
                while self.broker.counts(where.queue)[1] == 0:  # until it consumes
                    if not child.alive():
                        raise child.failed("the consumer exited before consuming")
                    _left(deadline)
                    time.sleep(0.02)
                start = time.monotonic()
                for n in range(count):
                    pause = start + n / rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    self.broker.publish_probe(where.exchange, where.routing_key, n)
                sending = time.monotonic() - start
                wait_count(scratch, count, deadline, child)
            stats = self._check_consumed(case, where, scratch, count)
            delays = sorted(read_samples(scratch))
            if len(delays) != count:
                raise RunFailed(f"{len(delays)} latency samples for {count} messages")
            return {
                "messages": count,
                "handled": sum(s["count"] for s in stats),
                "send_rate": count / sending if sending > 0 else math.inf,
                "p50_ms": _percentile(delays, 0.50) * 1000,
                "p99_ms": _percentile(delays, 0.99) * 1000,
                "max_ms": delays[-1] * 1000,
            }

    # -- helpers -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _fresh(self, case: Case) -> Iterator[tuple[Target, Path]]:
        """A new token's topology on the broker and a scratch directory, both removed after.

        A peer that declares its own queues gets none declared: they are only deleted after.
        """
        where = target(new_token(), case.place)
        own = PEERS[case.peer].own_queues(where.queue) if case.peer else []
        topology = where.topology()
        if own:
            self.declared.append({"exchange": None, "queues": own})
        else:
            self.declared.append(
                {"exchange": topology.exchange, "queues": [spec.name for spec in topology.queues]}
            )

        def delete() -> None:
            if own:
                self.broker.delete_queues(own)
            else:
                self.broker.delete(topology)

        with tempfile.TemporaryDirectory(prefix=f"{case.id}-", dir=self.workdir) as scratch:
            try:
                if own:
                    self.broker.adopt(own)
                else:
                    self.broker.declare(topology)
                yield where, Path(scratch)
            finally:
                try:
                    delete()
                except Exception:
                    # The connection may have been cut mid-frame by a Ctrl-C: a fresh one.
                    self.broker.close()
                    delete()

    def _fill(self, case: Case, where: Target, scratch: Path, deadline: float) -> None:
        """Pre-fill a peer's queue with N messages sent by the peer's own client."""
        n = self.plan.n
        argv = [sys.executable, "-m", PEERS[case.peer].module, "fill", "--count", str(n)]
        with running(argv, self._env(where, scratch), scratch / "fill.log") as child:
            if child.wait(deadline) != 0:
                raise child.failed("the pre-fill failed")
        try:
            self.broker.wait_messages(where.queue, n, min(30.0, _left(deadline)))
        except TimeoutError as exc:
            raise RunFailed(f"after the pre-fill: {exc}") from None

    def _check_consumed(
        self, case: Case, where: Target, scratch: Path, expected: int
    ) -> list[dict[str, Any]]:
        """After the consumer stopped: exactly `expected` calls, nothing left or parked.

        The broker notices a closed connection, drops its consumer and puts its unacked
        messages back asynchronously: first wait for the consumer to go, then require the
        queue to stay empty a moment.
        """
        stats = read_stats(scratch)
        handled = sum(s["count"] for s in stats)
        if handled != expected:
            raise RunFailed(f"{handled} handler calls for {expected} messages")
        gone = time.monotonic() + _CONSUMER_GONE
        while self.broker.counts(where.queue)[1]:
            if time.monotonic() > gone:
                raise RunFailed(
                    f"{where.queue} still has a consumer {_CONSUMER_GONE:g}s after the "
                    "consumer process exited"
                )
            time.sleep(0.02)
        dead = PEERS[case.peer].dead_letter(where.queue) if case.peer else f"{where.queue}.dead"
        settled = time.monotonic() + _SETTLED
        while True:
            left = self.broker.counts(where.queue)[0]
            parked = self.broker.counts(dead)[0]
            if left or parked:
                raise RunFailed(
                    f"after the consumer stopped, {where.queue} holds {left} messages "
                    f"(unacked or handed back) and {parked} are parked"
                )
            if time.monotonic() > settled:
                return stats
            time.sleep(0.05)

    def _argv(
        self, case: Case, where: Target, *, count: int = 0, out: Path | None = None
    ) -> list[str]:
        if case.listener:
            return [
                cli(),
                "run",
                "bench.apps",
                "--listener",
                case.listener,
                "--workers",
                str(case.workers),
            ]  # at the default log level, as deployed
        if case.peer:
            peer = PEERS[case.peer]
            if case.group == "consume":
                return [sys.executable, *peer.consumer]
            return [
                sys.executable,
                "-m",
                peer.module,
                "publish",
                "--count",
                str(count),
                "--out",
                str(out),
            ]
        publish = ["--count", str(count), "--window", str(self.plan.window), "--out", str(out)]
        if case.publisher:
            return [sys.executable, "-m", "bench.publish", case.publisher, *publish]
        return [
            sys.executable,
            "-m",
            "bench.baselines",
            *case.baseline_argv,
            "--queue",
            where.queue,
            "--exchange",
            where.exchange,
            "--routing-key",
            where.routing_key,
            "--prefetch",
            str(self.plan.prefetch),
            *(publish if out is not None else ()),
        ]

    def _env(
        self,
        where: Target,
        scratch: Path,
        case: Case,
        *,
        expect: int = 0,
        profile: bool = False,
    ) -> dict[str, str]:
        # The framework's settings at their defaults: a stray AMQP_LISTENER_QUEUE_TYPE would
        # make the framework's queues differ from the baseline's.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AMQP_LISTENER_")}
        env.update(
            {
                "AMQP_URL": self.plan.url,
                "BENCH_TOKEN": where.exchange,
                "BENCH_PREFETCH": str(self.plan.prefetch),
                # Where a peer works (its worker is started by its own command, without ours).
                "BENCH_EXCHANGE": where.exchange,
                "BENCH_ROUTING_KEY": where.routing_key,
                "BENCH_QUEUE": where.queue,
                # Dramatiq's prefetch setting (it reads no other).
                "dramatiq_queue_prefetch": str(self.plan.prefetch),
                ENV_DIR: str(scratch),
                ENV_EXPECT: str(expect),
            }
        )
        if profile:
            env[ENV_PROFILE] = "1"
        if case.database:
            env["AMQP_LISTENER_DATABASE_URL"] = self.ledgers.url(case.database, scratch)
        return env


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the case's time ran out")
    return left


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
