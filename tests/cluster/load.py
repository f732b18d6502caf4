"""Load and bookkeeping shared by the cluster scenarios: a backlog, a runner on the list of
URLs, and what its log and its workers' journals say about who is connected where."""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass

from faults.harness import Fault, Runner, Verdict, wait_until

from cluster.cluster import ClusterNode
from listener.errors import PublishConnectionLost, PublishNacked, PublishTimeout

CONCURRENCY = 8
WORKERS = 2
BACKLOG = 1200
#: A handler's time: slow enough that the backlog is still there when the fault strikes.
HANDLER_SECONDS = 0.05
#: The rolling restart's: its backlog must last through three restarts.
ROLLING_HANDLER_SECONDS = 0.2
#: What a publish may raise when its node dies: all say "outcome unknown" or "not taken".
DOCUMENTED = {PublishConnectionLost.__name__, PublishTimeout.__name__, PublishNacked.__name__}


#: What a worker logs when one of its connections opens on a node of the list.
CONNECTED = re.compile(r"amqp-listener worker pid=(\d+) \[[^\]]*\] connected to \S+?@([^/]+)/")


def reconnects(runner: Runner) -> int:
    return runner.stderr.count("reconnected to ")


def worker_nodes(runner: Runner) -> list[str]:
    """The `host:port` of the node each worker's connections are open to now."""
    return list({int(pid): node for pid, node in CONNECTED.findall(runner.stderr)}.values())


def workers_on(runner: Runner, node: ClusterNode) -> int:
    """How many workers' connections are open to `node` now."""
    return worker_nodes(runner).count(node.endpoint)


def handled_by_worker(fault: Fault) -> dict[int, int]:
    """{worker pid: messages it handled so far}, from the workers' journals."""
    counts = {}
    for journal in fault.events_dir.glob("events-*.log"):
        pid = int(journal.stem.removeprefix("events-"))
        counts[pid] = sum(1 for line in journal.read_text().splitlines() if line[:5] == "done ")
    return counts


def wait_consuming_again(fault: Fault, runner: Runner, lost_workers: int) -> float:
    """Wait until the workers that lost their node reconnected, and every worker handled a
    message since; the monotonic time it happened.

    Handled messages, not the queue's consumer count, tell: a quorum queue keeps listing
    the consumers of a dead node (inactive) until that node comes back.
    """
    before = handled_by_worker(fault)
    wait_until(lambda: reconnects(runner) >= lost_workers, 30, "the workers to reconnect")

    def every_worker_handled_one() -> bool:
        now = handled_by_worker(fault)
        return all(now.get(pid, 0) > before.get(pid, 0) for pid in runner.live_workers())

    wait_until(every_worker_handled_one, 30, "every worker to handle a message again")
    return time.monotonic()


def start_loaded(
    fault: Fault, backlog: int = BACKLOG, *, sleep: float = HANDLER_SECONDS, **env: str
) -> Runner:
    """A backlog of confirmed messages (each handled in `sleep` seconds), then the runner on
    the list, under way."""
    fault.publish(backlog, sleep=sleep, timeout=120)
    runner = fault.start_runner(workers=WORKERS, FAULT_CONCURRENCY=str(CONCURRENCY), **env)
    wait_until(lambda: fault.handled_count() >= 50, 30, "the backlog to start moving")
    return runner


def in_flight(fault: Fault) -> int:
    return len(fault.outstanding())


def assert_survived(verdict: Verdict, fault: Fault, runner: Runner, losses: int = 1) -> None:
    """Nothing lost nor parked, at most a prefetch of duplicates per worker per connection
    loss, only the documented publish errors, and no worker died of it."""
    verdict.assert_nothing_lost()
    assert verdict.duplicates <= losses * CONCURRENCY * WORKERS
    assert verdict.parked == 0
    assert set(fault.unknown.values()) <= DOCUMENTED, "a publish error not documented"
    assert runner.deaths() == [], "a worker died instead of reconnecting"


@dataclass(frozen=True)
class Publishing:
    """What the test's publishing saw, timed from a moment (the fault): every publish that
    raised, and how soon confirms came again."""

    #: (seconds from the moment, negative before it; the PublishError raised), every one.
    errors: list[tuple[float, str]]
    #: Seconds from the last error to the next confirm (None: no error, or none since).
    recovered_s: float | None
    #: The longest wait between two confirms after the moment (or until the first one).
    longest_pause_s: float

    def __str__(self) -> str:
        errors = ", ".join(f"{kind} {at:+.2f}s" for at, kind in self.errors) or "none"
        recovered = (
            ""
            if self.recovered_s is None
            else (f", confirmed again {self.recovered_s:.2f}s after the last")
        )
        return (
            f"publish errors (from the fault): {errors}{recovered}; longest pause between "
            f"confirms {self.longest_pause_s:.2f}s"
        )


def publishing_since(fault: Fault, since: float) -> Publishing:
    """Every publish error of the test, and the pauses after monotonic time `since`."""
    with fault._lock:
        errors = sorted((at - since, fault.unknown[mid]) for mid, at in fault.failed_at.items())
        confirms = sorted(at for at in fault.confirmed.values() if at >= since)
    recovered = None
    if errors:
        last = since + errors[-1][0]
        after = [at for at in confirms if at > last]
        recovered = after[0] - last if after else None
    marks = [since, *confirms]
    pauses = [later - earlier for earlier, later in itertools.pairwise(marks)]
    return Publishing(errors, recovered, max(pauses, default=0.0))
