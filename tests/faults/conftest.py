"""Fixtures of the fault suite: one project-owned RabbitMQ node for the fault suite, a fault
harness per test, and a summary table of every verdict at the end of the run.

The node listens on its own ports (5682 and distribution port 25682, or the next free pair)
with its data under a temporary directory; the shared broker on 5672 is never stopped, killed
or reconfigured. Without the RabbitMQ server binaries the suite is skipped locally and fails
in CI (`CI` set), like the broker tests in tests/conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from faults.harness import VERDICTS, Fault
from faults.node import SERVER, RabbitNode


@pytest.fixture(scope="package")
def node() -> Iterator[RabbitNode]:
    """A single RabbitMQ node owned by this run; stopped and deleted at the end."""
    if not RabbitNode.available():
        message = f"no RabbitMQ server binaries at {SERVER}: install the rabbitmq-server package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    rabbit_node = RabbitNode.create()
    try:
        rabbit_node.start()
        yield rabbit_node
    finally:
        rabbit_node.destroy()


@pytest.fixture
def fault(node: RabbitNode, unique: str, tmp_path: Path, record_property) -> Iterator[Fault]:
    """This test's harness on a node brought back to a clean, serving state first."""
    node.ensure_serving()
    harness = Fault(node, unique, tmp_path, record_property)
    try:
        yield harness
    finally:
        harness.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not VERDICTS:
        return
    terminalreporter.section("fault suite: lost / duplicates / time to recover")
    header = (
        f"{'fault':<46} {'confirmed':>9} {'lost':>5} {'dups':>5} {'unknown':>8} "
        f"{'retried':>7} {'parked':>6} {'bad':>4} {'recovery':>9}"
    )
    terminalreporter.write_line(header)
    for v in VERDICTS:
        recovery = "-" if v.recovery_s is None else f"{v.recovery_s:.1f}s"
        terminalreporter.write_line(
            f"{v.fault:<46} {v.confirmed:>9} {v.lost:>5} {v.duplicates:>5} "
            f"{f'{v.unknown}/{v.unknown_arrived}':>8} {v.retried:>7} {v.parked:>6} {v.bad:>4} "
            f"{recovery:>9}"
        )
        if v.notes:
            terminalreporter.write_line(f"    {v.notes}")
    terminalreporter.write_line(
        "unknown = publishes that raised / of those, handled anyway; "
        "retried = messages that failed a first attempt on purpose"
    )
