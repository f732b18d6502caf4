"""Fixtures of the cluster suite: one real three-node RabbitMQ cluster for the package, a
fault harness per test whose runners and publishers are given the list of the three URLs,
and a table of every verdict at the end of the run.

The cluster is started once (about half a minute) and torn down when the cluster tests are
done (three idle nodes would slow every test after them), even when a test fails; after
each test every node is brought back to serving and clustered. Without the RabbitMQ server
binaries the suite is skipped locally and fails in CI (`CI` set), like the fault suite.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from faults.harness import VERDICTS, Fault
from faults.node import SERVER, RabbitNode

from cluster.cluster import Cluster
from cluster.netns import NamespacedCluster, netns_refused


def need_rabbitmq_binaries() -> None:
    """Skip, saying why, without the RabbitMQ server binaries; in CI (`CI` set), fail."""
    if not RabbitNode.available():
        message = f"no RabbitMQ server binaries at {SERVER}: install the rabbitmq-server package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    """Three clustered RabbitMQ nodes owned by this run; stopped and deleted at the end."""
    need_rabbitmq_binaries()
    three = Cluster.create()
    try:
        three.start()
        yield three
    finally:
        three.destroy()


class ClusterFault(Fault):
    """The fault harness, pointed at the cluster: every URL it hands out is the list."""

    def _broker(self) -> pika.BlockingConnection:
        candidates = []
        for url in self.node.url.split(","):
            params = pika.URLParameters(url)
            params.socket_timeout = 5
            params.connection_attempts = 1
            candidates.append(params)
        return pika.BlockingConnection(candidates)


@contextlib.contextmanager
def harness_on(cluster: Cluster, unique: str, tmp: Path, record) -> Iterator[Fault]:
    """A fault harness on a cluster whose three nodes serve; healed again afterwards."""
    cluster.heal()
    harness = ClusterFault(cluster, unique, tmp, record)  # type: ignore[arg-type]
    try:
        yield harness
    finally:
        harness.close()
        with contextlib.suppress(Exception):
            cluster.heal()


@pytest.fixture
def fault(cluster: Cluster, unique: str, tmp_path: Path, record_property) -> Iterator[Fault]:
    """This test's harness on the package's cluster."""
    with harness_on(cluster, unique, tmp_path, record_property) as harness:
        yield harness


@pytest.fixture(scope="package")
def partitionable() -> Iterator[NamespacedCluster]:
    """Three clustered nodes in network namespaces of their own (for partitions); skipped,
    saying why, where network namespaces are refused."""
    need_rabbitmq_binaries()
    refused = netns_refused()
    if refused is not None:
        pytest.skip(f"a partition needs network namespaces (root): {refused}")
    three = NamespacedCluster.create()
    try:
        three.start()
        yield three
    finally:
        three.destroy()


@pytest.fixture
def partition_fault(
    partitionable: NamespacedCluster, unique: str, tmp_path: Path, record_property
) -> Iterator[Fault]:
    """This test's harness on the namespaced cluster."""
    with harness_on(partitionable, unique, tmp_path, record_property) as harness:
        yield harness


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    verdicts = [v for v in VERDICTS if v.fault.startswith("C")]
    if not verdicts:
        return
    terminalreporter.section("cluster suite: lost / duplicates / time to recover")
    terminalreporter.write_line(
        f"{'fault':<58} {'confirmed':>9} {'lost':>5} {'dups':>5} {'unknown':>8} {'recovery':>9}"
    )
    for v in verdicts:
        recovery = "-" if v.recovery_s is None else f"{v.recovery_s:.1f}s"
        terminalreporter.write_line(
            f"{v.fault:<58} {v.confirmed:>9} {v.lost:>5} {v.duplicates:>5} "
            f"{f'{v.unknown}/{v.unknown_arrived}':>8} {recovery:>9}"
        )
        if v.notes:
            terminalreporter.write_line(f"    {v.notes}")
