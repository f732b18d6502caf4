"""Blame's pure parts: the journal a worker leaves behind, the supervisor's verdict on a
death, and the gate that lets a suspect run alone. The whole of it, with real processes
killed by real poison, is in tests/faults/test_poison.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from listener.runner import journal
from listener.runner.blame import Blame, Gate, Isolation, Suspects, journal_path
from listener.runner.journal import Journal, Running

# -- the journal ----------------------------------------------------------------------------------


def test_the_journal_holds_what_runs_now_and_nothing_that_ended(tmp_path):
    path = tmp_path / "journal"
    entries = Journal(path, slots=4)
    first = entries.begin("orders", "m-1", time.monotonic())
    second = entries.begin("orders", "m-2", time.monotonic())
    entries.end(first)

    [running] = journal.read(path)
    assert (running.queue, running.message_id) == ("orders", "m-2")
    assert abs(running.started_at - time.time()) < 5  # read back as wall-clock time
    entries.end(second)
    assert journal.read(path) == []


@pytest.mark.slow
def test_a_journal_survives_its_process_killed_minus_9_with_every_entry_whole(tmp_path):
    path = tmp_path / "journal"
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from pathlib import Path
        from listener.runner.journal import Journal
        entries = Journal(Path({str(path)!r}), slots=8)
        for n in range(5):
            entries.begin("q", f"m-{{n}}", time.monotonic())
        entries.end(1)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=30)

    assert done.returncode == -signal.SIGKILL
    assert sorted(entry.message_id for entry in journal.read(path)) == ["m-0", "m-2", "m-3", "m-4"]


def test_a_full_journal_records_nothing_more_and_a_long_id_is_cut_not_refused(tmp_path):
    entries = Journal(tmp_path / "journal", slots=1)
    assert entries.begin("q", "x" * 1000, time.monotonic()) == 0
    assert entries.begin("q", "m-2", time.monotonic()) == -1
    entries.end(-1)  # a delivery that got no entry ends harmlessly
    [running] = journal.read(tmp_path / "journal")
    assert running.message_id.startswith("xxxx") and len(running.message_id) < 1000


def test_reading_a_journal_that_is_not_there_finds_nothing(tmp_path):
    assert journal.read(tmp_path / "missing") == []


def test_closing_a_journal_removes_its_file(tmp_path):
    entries = Journal(tmp_path / "journal", slots=2)
    entries.close()
    assert not (tmp_path / "journal").exists()


# -- the verdict ----------------------------------------------------------------------------------


def test_a_death_with_one_message_running_is_blamed_on_it_and_on_nothing_else(tmp_path):
    suspects = Suspects(tmp_path / "suspects.json")
    blamed = suspects.record_death([Running("orders", "poison", 0.0)])
    assert blamed == Running("orders", "poison", 0.0)
    assert suspects.deaths("orders", "poison") == 1
    assert suspects.deaths("orders", "innocent") is None


def test_a_death_with_several_messages_running_blames_none_and_makes_each_a_suspect(tmp_path):
    suspects = Suspects(tmp_path / "suspects.json")
    running = [Running("orders", f"m-{n}", 0.0) for n in range(8)]
    assert suspects.record_death(running) is None
    assert [suspects.deaths("orders", f"m-{n}") for n in range(8)] == [0] * 8


def test_suspects_are_kept_per_queue_since_two_listeners_get_the_same_message_id(tmp_path):
    suspects = Suspects(tmp_path / "suspects.json")
    suspects.record_death([Running("billing", "m-1", 0.0)])
    assert suspects.deaths("billing", "m-1") == 1
    assert suspects.deaths("shipping", "m-1") is None


def test_workers_see_the_supervisors_verdicts_and_a_reloaded_supervisor_keeps_them(tmp_path):
    blame = Blame(os.getpid(), fresh=True)
    try:
        isolation = Isolation(blame.runtime, slots=4)
        assert isolation.deaths("orders", "m-1") is None
        dead = journal_path(blame.runtime, 4242)
        Journal(dead, slots=4).begin("orders", "m-1", time.monotonic())

        assert blame.worker_ended(4242, died=True) == Running(
            "orders", "m-1", pytest.approx(0, abs=1e12)
        )
        assert isolation.deaths("orders", "m-1") == 1
        assert not dead.exists()
        reloaded = Blame(os.getpid(), fresh=False)
        assert reloaded.suspects.deaths("orders", "m-1") == 1
        isolation.close()
    finally:
        blame.remove()
    assert not blame.runtime.exists()


def test_a_worker_that_stopped_or_was_stopped_makes_no_suspect(tmp_path):
    told: list[int] = []
    blame = Blame(os.getpid(), fresh=True, on_lost=lambda pid, _running: told.append(pid))
    try:
        Journal(journal_path(blame.runtime, 4343), slots=2).begin("orders", "m-1", time.monotonic())
        assert blame.worker_ended(4343, died=False) is None
        assert blame.suspects.deaths("orders", "m-1") is None
        assert not journal_path(blame.runtime, 4343).exists()
        assert told == []
    finally:
        blame.remove()


def test_the_files_of_a_runner_killed_before_its_cleanup_are_removed_by_the_next(tmp_path):
    orphan = Path(tempfile.gettempdir()) / f"amqp-listener-{os.getuid()}-{dead_pid()}"
    orphan.mkdir()
    blame = Blame(os.getpid(), fresh=True)
    try:
        assert not orphan.exists()
    finally:
        blame.remove()


def blame_base() -> str:
    import tempfile

    return tempfile.gettempdir()


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


# -- the gate -------------------------------------------------------------------------------------


async def test_a_suspect_waits_for_the_running_messages_and_holds_back_new_ones():
    gate = Gate()
    order: list[str] = []
    gate.running += 2  # two ordinary messages run

    async def suspect() -> None:
        await gate.enter_alone()
        order.append("suspect starts")
        await asyncio.sleep(0.01)
        order.append("suspect ends")
        gate.leave_alone()

    async def newcomer() -> None:
        if gate.suspects:
            await gate.wait_open()
        order.append("newcomer starts")

    alone = asyncio.ensure_future(suspect())
    await asyncio.sleep(0)
    late = asyncio.ensure_future(newcomer())
    await asyncio.sleep(0.01)
    assert order == []  # the suspect waits for the two; the newcomer waits for the suspect
    gate.leave()
    gate.leave()
    await asyncio.gather(alone, late)
    assert order == ["suspect starts", "suspect ends", "newcomer starts"]


async def test_a_suspect_cancelled_while_waiting_opens_the_gate_again():
    gate = Gate()
    gate.running += 1
    waiting = asyncio.ensure_future(gate.enter_alone())
    await asyncio.sleep(0)
    assert gate.suspects
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not gate.suspects
    await asyncio.wait_for(gate.wait_open(), 1)


async def test_two_suspects_run_one_after_the_other():
    gate = Gate()
    running: list[int] = []
    overlaps: list[int] = []

    async def suspect(n: int) -> None:
        await gate.enter_alone()
        running.append(n)
        overlaps.append(len(running))
        await asyncio.sleep(0.005)
        running.remove(n)
        gate.leave_alone()

    await asyncio.gather(*(suspect(n) for n in range(3)))
    assert overlaps == [1, 1, 1]
