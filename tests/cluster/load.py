"""Load and bookkeeping shared by the cluster scenarios: a backlog, a runner on the list of
URLs, and what its log and its workers' journals say about who is connected where."""

from __future__ import annotations

import re
import time

from faults.harness import Fault, Runner, Verdict, wait_until

from cluster.cluster import ClusterNode
from listener.errors import PublishConnectionLost, PublishNacked, PublishTimeout

CONCURRENCY = 8
WORKERS = 2
BACKLOG = 1200
#: A handler's time: slow enough that the backlog is still there when the fault strikes.
HANDLER_SECONDS = 0.05
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


def start_loaded(fault: Fault, backlog: int = BACKLOG, **env: str) -> Runner:
    """A backlog of confirmed messages, then the runner on the list, under way."""
    fault.publish(backlog, sleep=HANDLER_SECONDS)
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
