"""Consuming from the healthy cluster against one node, for the same consume case.

The bench's framework consume cases (an async no-op listener with `--workers 1`, its
baseline, and `--workers 2`, the load of the fault scenarios) consume N pre-filled
messages from a fresh quorum queue. Each repeat runs them twice, one after the other: with
AMQP_URL the list of the cluster's three nodes (the queue replicated on all three, the
workers spread over the nodes), and on a node of its own (same RabbitMQ, same
configuration, the queue on it alone). Every run must consume all N messages through the
list of nodes; the ratios of the medians are printed, not asserted: timings on a shared
machine are too noisy for a timed test (`CLUSTER_BENCH_REPEATS` raises the repeats, 1 by
default, for a figure worth quoting). On a machine of two cores `--workers 2` measures the
machine as much as the cluster: three brokers and two workers share the cores there, where
one broker and two workers did.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults.node import RabbitNode

from cluster.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
N = 10_000
REPEATS = int(os.environ.get("CLUSTER_BENCH_REPEATS", "1"))
CASES = ("async", "workers2")


@pytest.fixture(scope="module")
def lone_node() -> Iterator[RabbitNode]:
    """One RabbitMQ node of its own, not clustered: the one-node side of the ratio."""
    node = RabbitNode.create()
    try:
        node.start()
        yield node
    finally:
        node.destroy()


def consume_rates(url: str) -> dict[str, float]:
    """{case: messages per second} of one bench run of CASES against `url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMQP_LISTENER_")}
    argv = [sys.executable, "-m", "bench", "--cases", ",".join(CASES), "--n", str(N)]
    argv += ["--repeats", "1", "--json", "--url", url]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    cases = json.loads(done.stdout)["cases"]
    for case in CASES:
        assert cases[case]["status"] == "ok", cases[case]["error"]
    return {case: float(cases[case]["runs"][0]["rate"]) for case in CASES}


def test_the_bench_consumes_every_message_through_the_clusters_list_of_nodes_and_reports_the_ratio(
    cluster: Cluster, lone_node: RabbitNode
):
    cluster.heal()
    samples: dict[str, dict[str, list[float]]] = {
        side: {case: [] for case in CASES} for side in ("cluster", "one node")
    }
    for _ in range(REPEATS):
        for side, url in (("cluster", cluster.url), ("one node", lone_node.url)):
            for case, rate in consume_rates(url).items():
                samples[side][case].append(rate)

    ratios = {}
    print(f"\nconsume throughput, N={N:,}, median of {REPEATS} (msg/s):")
    for case in CASES:
        on_cluster = statistics.median(samples["cluster"][case])
        alone = statistics.median(samples["one node"][case])
        ratios[case] = on_cluster / alone
        print(
            f"  {case:<9} cluster {on_cluster:>7.0f}  one node {alone:>7.0f}  "
            f"ratio {ratios[case]:.2f}  (cluster runs "
            + ", ".join(f"{r:.0f}" for r in samples["cluster"][case])
            + "; one-node runs "
            + ", ".join(f"{r:.0f}" for r in samples["one node"][case])
            + ")"
        )
    # consume_rates() failed already if any run fell short of N: here, that every case ran.
    assert set(ratios) == set(CASES)
