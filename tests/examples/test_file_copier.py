"""The FileCopier example (`make demo`), in memory and against RabbitMQ."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from examples.file_copier.listeners import CopyRequest, FileCopier
from listener.testing import MemoryBroker


def test_a_relative_destination_is_parked_at_once(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a\n")
    with MemoryBroker(FileCopier) as broker:
        FileCopier.notify(case_id=1, src=str(tmp_path / "a.txt"), dst="b.txt")
        broker.join(fail_fast=False)
    [parked] = broker.parked(FileCopier)
    assert parked.reason == "rejected"
    assert parked.attempts == 1
    assert parked.exception_message == "case 1: destination must be an absolute path"


def test_a_missing_source_is_retried_then_parked_with_the_error(tmp_path: Path) -> None:
    with MemoryBroker(FileCopier) as broker:
        start = broker.clock.now
        FileCopier.notify(case_id=4, src=str(tmp_path / "missing.txt"), dst=str(tmp_path / "d"))
        broker.join(fail_fast=False)
    [parked] = broker.parked(FileCopier)
    assert parked.reason == "failed"
    assert parked.attempts == 3
    assert parked.exception_type.endswith("FileNotFoundError")
    assert broker.clock.now - start >= 1 + 2  # waited out both retry delays
    assert broker.handled(FileCopier) == []


def test_a_copy_is_made_and_acked(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a\n")
    request = CopyRequest(case_id=1, src=str(tmp_path / "a.txt"), dst=str(tmp_path / "b.txt"))
    with MemoryBroker(FileCopier, fail_fast=True) as broker:
        FileCopier.notify(request)
        broker.join()
    assert broker.handled(FileCopier) == [request]
    assert (tmp_path / "b.txt").read_text() == "a\n"


@pytest.mark.slow
def test_the_demo_handles_three_copies_and_parks_the_fourth(
    run_demo: Callable[[str], subprocess.CompletedProcess[str]],
) -> None:
    result = run_demo("examples.file_copier.demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3. handled: a.copy, b.copy, c.copy" in result.stdout
    assert "x-parked-reason: failed" in result.stdout
    assert "x-attempts: 3" in result.stdout
    assert "x-exception-type: FileNotFoundError" in result.stdout
    assert "runner exit code: 0" in result.stdout
    # Did it run? The ledger answers for a handled message and for the parked one.
    assert "state: handled   now: nowhere (acked)" in result.stdout
    assert "state: parked   now: file_copier.dead" in result.stdout
