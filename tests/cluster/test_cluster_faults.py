"""Node faults on a real three-node cluster, under load, Jepsen-style.

A runner with `--workers 2` is given the list of the three URLs; a backlog of confirmed
messages with unique ids is waiting when the fault strikes, and publishing goes on through
it (with the list too). Then the suite drains and classifies (tests/faults/harness.py):
**lost** (confirmed, never handled nor parked) must be 0; **duplicates** are counted and
bounded by what was in flight; the time until both workers consume again is measured. The
fault ids (C1...) are those of the cluster table printed at the end of the run.
"""

from __future__ import annotations

import time

import pytest
from faults.harness import wait_until

from cluster.cluster import Cluster
from cluster.load import (
    BACKLOG,
    HANDLER_SECONDS,
    ROLLING_HANDLER_SECONDS,
    WORKERS,
    assert_survived,
    in_flight,
    publishing_since,
    reconnects,
    start_loaded,
    wait_consuming_again,
    worker_nodes,
    workers_on,
)

# A session fixture boots a cluster (~30-70 s on a busy machine) inside the first test's time.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# -- C1: kill -9 of the node that leads the listener's queue --------------------------------


def test_killing_the_node_that_leads_the_queue_under_load_loses_nothing(fault, cluster: Cluster):
    fault.declare()
    assert cluster.members_of(fault.queue) == {node.name for node in cluster.nodes}
    runner = start_loaded(fault, 2 * BACKLOG)  # moving the leader takes a few seconds
    # The leader is moved to a worker's node: the kill takes a consumer down with it.
    leader = cluster.node_on(worker_nodes(runner)[0])
    cluster.move_leader(fault.queue, leader)
    pid = leader.os_pid()  # asked now: asking takes a second the kill must not wait for

    with fault.publishing(600, sleep=HANDLER_SECONDS, interval=0.002, timeout=120):
        waiting = in_flight(fault)
        lost_workers = workers_on(runner, leader)
        leader.kill(pid)
        killed = time.monotonic()
        back = wait_consuming_again(fault, runner, lost_workers) - killed
        new_leader = cluster.leader_of(fault.queue)
    settled = fault.wait_settled(120)
    publishing = publishing_since(fault, killed)

    verdict = fault.verdict(
        f"C1 kill -9 queue leader, --workers {WORKERS}, {2 * BACKLOG}+600 msgs",
        recovery_s=back,
        notes=(
            f"{waiting} confirmed-unhandled at the kill; {lost_workers} worker(s) were on the "
            f"leader's node; leader moved to {new_leader.port}; "
            f"all handled {settled - killed:.1f}s after the kill; {publishing}"
        ),
    )
    assert_survived(verdict, fault, runner)
    # Publishing recovered: a nacked publish reopens its channel rather than fail forever.
    assert verdict.confirmed == 2 * BACKLOG + 600
    assert waiting >= 1000, "the kill hit too small a backlog to prove anything"
    assert new_leader is not leader
    assert lost_workers >= 1, "no worker was on the leader's node"
    assert back < 10, "consumers were not back within 10 s of the kill"
    # A nacked or lost publish is followed by a confirmed one within a second or so (the
    # next publish opens a fresh channel), not by a run of failures.
    assert publishing.recovered_s is None or publishing.recovered_s < 2.0, publishing


# -- C2: stop of a follower ------------------------------------------------------------------


def test_stopping_a_follower_under_load_loses_nothing(fault, cluster: Cluster):
    fault.declare()
    runner = start_loaded(fault, 2 * BACKLOG)
    # The follower stopped is a worker's node; the leader is elsewhere.
    follower = cluster.node_on(worker_nodes(runner)[0])
    leader = next(node for node in cluster.nodes if node is not follower)
    cluster.move_leader(fault.queue, leader)

    with fault.publishing(600, sleep=HANDLER_SECONDS, interval=0.002, timeout=120):
        waiting = in_flight(fault)
        lost_workers = workers_on(runner, follower)
        stopped = time.monotonic()  # stop_app returns once the node closed its connections
        follower.stop_app()
        back = wait_consuming_again(fault, runner, lost_workers) - stopped
    settled = fault.wait_settled(120)

    verdict = fault.verdict(
        f"C2 stop_app of a follower, --workers {WORKERS}, {2 * BACKLOG}+600 msgs",
        recovery_s=back,
        notes=(
            f"{waiting} confirmed-unhandled at the stop; {lost_workers} worker(s) were on it; "
            f"all handled {settled - stopped:.1f}s after it; "
            f"reconnects {reconnects(runner)}; {publishing_since(fault, stopped)}"
        ),
    )
    assert_survived(verdict, fault, runner)
    assert waiting >= 1000, "the stop hit too small a backlog to prove anything"
    assert cluster.leader_of(fault.queue) is leader  # a follower's loss moves no leader
    assert lost_workers >= 1, "no worker was on the follower stopped"


# -- C3: a rolling restart of all three nodes ------------------------------------------------


def test_a_rolling_restart_of_every_node_under_load_loses_nothing(fault, cluster: Cluster):
    fault.declare()
    # Slower handlers and a bigger backlog: the load lasts through all three restarts.
    runner = start_loaded(fault, 3 * BACKLOG, sleep=ROLLING_HANDLER_SECONDS)
    pauses, backs, waiting = [], [], []

    with fault.publishing(900, sleep=ROLLING_HANDLER_SECONDS, interval=0.02, timeout=180):
        began = time.monotonic()
        for node in cluster.nodes:
            waiting.append(in_flight(fault))
            on_it = workers_on(runner, node)
            expected = reconnects(runner) + on_it
            stopping = time.monotonic()
            node.stop_app()
            down = time.monotonic()
            # Every worker that was on it consumes on another node before it comes back.
            wait_until(lambda e=expected: reconnects(runner) >= e, 30, "its workers to reconnect")
            backs.append((on_it, time.monotonic() - stopping))
            node.start_app()
            cluster.wait_clustered(60)
            # The next node goes only once this one's replica is back in the queue.
            wait_until(lambda n=node: n.name in cluster.members_of(fault.queue), 30, "replica back")
            pauses.append(time.monotonic() - down)
    settled = fault.wait_settled(180)

    verdict = fault.verdict(
        f"C3 rolling restart of 3 nodes, --workers {WORKERS}, {3 * BACKLOG}+900 msgs",
        recovery_s=max(back for _, back in backs),
        notes=(
            "confirmed-unhandled at each stop "
            + ", ".join(str(n) for n in waiting)
            + "; workers on the node stopped, and seconds until they consumed elsewhere: "
            + ", ".join(f"{n} in {back:.1f}s" for n, back in backs)
            + "; node down "
            + ", ".join(f"{p:.1f}s" for p in pauses)
            + f"; all handled {settled - began:.1f}s after the first stop; reconnects "
            f"{reconnects(runner)}; {publishing_since(fault, began)}"
        ),
    )
    assert_survived(verdict, fault, runner, losses=3)
    assert min(waiting) >= 1000, "a restart hit too small a backlog to prove anything"
    assert sum(n for n, _ in backs) >= WORKERS, "not every worker lost its node once"
    assert max(back for _, back in backs) < 10, "consumers were not back within 10 s"
