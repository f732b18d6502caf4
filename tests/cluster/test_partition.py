"""A network partition of one node of three, under load, with `pause_minority`, then healed.

The nodes live in network namespaces joined by a bridge (cluster/netns.py); the partition
takes the host side of one node's veth down, cutting it off from the other nodes and from
every client at once. Nothing closes the clients' connections to it (its packets are
dropped), so the runner and the publisher notice by their heartbeats and time-outs, which
this test shortens. Where network namespaces are refused, the test is skipped and says so.
"""

from __future__ import annotations

import time

import pytest
from faults.harness import wait_until

from cluster.load import (
    BACKLOG,
    CONCURRENCY,
    DOCUMENTED,
    HANDLER_SECONDS,
    WORKERS,
    in_flight,
    start_loaded,
    wait_consuming_again,
    worker_nodes,
    workers_on,
)
from cluster.netns import NamespacedCluster

pytestmark = pytest.mark.slow

#: Short enough that a connection into the partition is given up within seconds.
CLIENT_SETTINGS = {"AMQP_LISTENER_HEARTBEAT": "4", "AMQP_LISTENER_CONNECT_TIMEOUT": "3"}


def test_a_partitioned_node_pauses_and_after_the_heal_no_message_is_lost(
    partition_fault, partitionable: NamespacedCluster
):
    fault, cluster = partition_fault, partitionable
    fault.declare()
    runner = start_loaded(fault, 2 * BACKLOG, **CLIENT_SETTINGS)
    # The node cut off leads the queue and has a worker: the hardest node to lose.
    minority = cluster.node_on(worker_nodes(runner)[0])
    cluster.move_leader(fault.queue, minority)
    majority = [node for node in cluster.nodes if node is not minority]
    publisher = fault.publisher(connect_timeout=3, heartbeat=4, confirm_timeout=5)

    with fault.publishing(600, publisher=publisher, sleep=HANDLER_SECONDS, timeout=150):
        waiting = in_flight(fault)
        lost_workers = workers_on(runner, minority)
        minority.cut_off()
        cut = time.monotonic()
        wait_until(
            lambda: minority.name not in cluster.running_names(majority[0]),
            40,
            "the majority to see the node gone",
        )
        back = wait_consuming_again(fault, runner, lost_workers) - cut
        leader = cluster.leader_of(fault.queue)
        time.sleep(2)  # the majority goes on working while the minority is cut off
        minority.reconnect()
        healed = time.monotonic()
        cluster.wait_clustered(90)
    settled = fault.wait_settled(120)

    verdict = fault.verdict(
        f"C4 partition of the leader node, healed, {2 * BACKLOG}+600 msgs",
        recovery_s=back,
        notes=(
            f"{waiting} confirmed-unhandled at the cut; {lost_workers} worker(s) on the cut "
            f"node; new leader {leader.endpoint}; cluster whole {time.monotonic() - healed:.1f}s "
            f"after the heal; all handled {settled - cut:.1f}s after the cut; publish errors "
            f"{sorted(set(fault.unknown.values()))}"
        ),
    )
    verdict.assert_nothing_lost()
    assert waiting >= 1000, "the cut hit too small a backlog to prove anything"
    assert lost_workers >= 1
    assert leader is not minority
    assert verdict.duplicates <= CONCURRENCY * WORKERS
    assert verdict.parked == 0
    assert set(fault.unknown.values()) <= DOCUMENTED
    assert runner.deaths() == [], "a worker died instead of reconnecting"
