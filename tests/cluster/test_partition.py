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
from faults.node import NodeError

from cluster.load import (
    BACKLOG,
    HANDLER_SECONDS,
    assert_survived,
    in_flight,
    publishing_since,
    start_loaded,
    wait_consuming_again,
    worker_nodes,
    workers_on,
)
from cluster.netns import NamespacedCluster, NamespacedNode

# A session fixture boots a cluster (~30-70 s on a busy machine) inside the first test's time.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

#: Short enough that a connection into the partition is given up within seconds.
CLIENT_SETTINGS = {"AMQP_LISTENER_HEARTBEAT": "4", "AMQP_LISTENER_CONNECT_TIMEOUT": "3"}


def resume(cluster: NamespacedCluster, minority: NamespacedNode) -> str:
    """Wait for the paused node to rejoin by itself; on a machine too busy for that within a
    minute, restart its application, as an operator would, and say so in the verdict."""
    try:
        cluster.wait_clustered(90)
    except NodeError as exc:
        status = minority.ctl("cluster_status", check=False, timeout=20)
        print(f"the paused node did not resume by itself: {exc}\n{status}")
        # A paused node may not answer stop_app either: restart it whole.
        minority.kill()
        minority.start()
        cluster.wait_clustered(120)
        return " (the node restarted by hand: it did not resume within 90 s)"
    return ""


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
        resumed = resume(cluster, minority)
        whole = time.monotonic()
    settled = fault.wait_settled(120)

    verdict = fault.verdict(
        f"C4 partition of the leader node, healed, {2 * BACKLOG}+600 msgs",
        recovery_s=back,
        notes=(
            f"{waiting} confirmed-unhandled at the cut; {lost_workers} worker(s) on the cut "
            f"node; new leader {leader.endpoint}; cluster whole {whole - healed:.1f}s after the "
            f"heal{resumed}; all handled {settled - cut:.1f}s after the cut; "
            f"{publishing_since(fault, cut)}"
        ),
    )
    assert_survived(verdict, fault, runner)
    assert waiting >= 1000, "the cut hit too small a backlog to prove anything"
    assert lost_workers >= 1
    assert leader is not minority
