"""One process of the supervisor (`listener.runner.child.ChildProcess`), with real forks and
real signals: a child that exits, one that ignores SIGTERM and is killed, a crash loop that
backs off, and what a worker reports on its status pipe.

The children here only make system calls and leave with `os._exit` (through
`listener.runner.child.fork`): no event loop, no logging, nothing that a fork from a test
process with threads could leave in a bad state. SIGCHLD is blocked while a test runs, as in
the supervisor, whose waits take it synchronously.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest
from support.waiting import alive, wait_until

from listener.errors import BrokerUnreachable
from listener.runner import status_pipe
from listener.runner.child import (
    BACKOFF_CAP,
    BACKOFF_FIRST,
    REAP_WAIT,
    SHORT_LIFE,
    ChildProcess,
    Exit,
)


@pytest.fixture(autouse=True)
def sigchld_blocked() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        yield
    finally:
        while signal.sigtimedwait({signal.SIGCHLD}, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@pytest.fixture
def children() -> Iterator[list[ChildProcess]]:
    """The children a test made; any still running at its end is killed."""
    made: list[ChildProcess] = []
    yield made
    for child in made:
        child.stop()


def reaped(child: ChildProcess, timeout: float = 5.0) -> Exit:
    """Wait until `child`'s process ended and reap it."""
    ended: list[Exit] = []

    def done() -> bool:
        exit_ = child.reap()
        if exit_ is not None:
            ended.append(exit_)
        return bool(ended)

    wait_until(done, timeout, f"child {child.number} to end")
    return ended[0]


def sleeper(*, ignore_term: bool) -> Callable[[], int]:
    """A child body that sleeps until killed (ignoring SIGTERM when asked)."""

    def body() -> int:
        if ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        while True:
            time.sleep(60)

    return body


def test_a_child_that_exits_is_reaped_with_its_exit_code_and_its_place_is_empty_again(
    children: list[ChildProcess],
) -> None:
    child = ChildProcess(1)
    children.append(child)
    pid = child.spawn(lambda: 3)

    assert child.pid == pid
    assert child.spawns == 1
    ended = reaped(child)

    assert ended.pid == pid
    assert os.WIFEXITED(ended.status) and os.WEXITSTATUS(ended.status) == 3
    assert 0 <= ended.lived < 5
    assert child.pid is None
    assert child.reap() is None  # nothing more to reap


def test_a_child_that_ignores_sigterm_is_killed_once_its_grace_is_over(
    children: list[ChildProcess],
) -> None:
    child = ChildProcess(1)
    children.append(child)
    pid = child.spawn(sleeper(ignore_term=True))
    wait_until(lambda: alive(pid) and _sigterm_ignored(pid), 5, "the child to ignore SIGTERM")

    began = time.monotonic()
    gone = child.stop(grace=0.5)
    took = time.monotonic() - began

    assert gone
    assert child.pid is None
    assert not alive(pid)
    assert 0.5 <= took < 0.5 + REAP_WAIT
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left behind


def test_a_child_that_honours_sigterm_stops_within_its_grace_without_a_sigkill(
    children: list[ChildProcess],
) -> None:
    child = ChildProcess(0)
    children.append(child)
    pid = child.spawn(sleeper(ignore_term=False))
    wait_until(lambda: alive(pid) and _signals_unblocked(pid), 5, "the child to run")

    began = time.monotonic()
    assert child.stop(grace=REAP_WAIT)

    assert time.monotonic() - began < REAP_WAIT
    assert not alive(pid)


def test_a_signal_reaches_the_child_and_its_wait_status_tells_which(
    children: list[ChildProcess],
) -> None:
    child = ChildProcess(2)
    children.append(child)
    pid = child.spawn(sleeper(ignore_term=False))
    wait_until(lambda: _signals_unblocked(pid), 5, "the child to run")

    child.signal(signal.SIGUSR1)
    ended = reaped(child)

    assert os.WIFSIGNALED(ended.status) and os.WTERMSIG(ended.status) == signal.SIGUSR1
    child.signal(signal.SIGUSR1)  # no process any more: nothing is sent, nothing raised


def test_a_crash_loop_backs_off_longer_each_time_and_a_long_life_starts_over(
    children: list[ChildProcess],
) -> None:
    child = ChildProcess(1)
    children.append(child)
    waits = []
    for _ in range(4):
        child.spawn(lambda: 1)
        ended = reaped(child)
        waits.append(child.back_off(ended.lived))
        assert child.restart_at is not None
        assert not child.due(time.monotonic() - 0.001)
    bases = [BACKOFF_FIRST * 2**n for n in range(4)]
    for wait, base in zip(waits, bases, strict=True):
        assert 0.8 * base <= wait <= min(1.2 * base, BACKOFF_CAP)

    assert child.back_off(lived=SHORT_LIFE) == 0.0  # a long life: at once, and reset
    assert child.due(time.monotonic())
    assert 0.8 * BACKOFF_FIRST <= child.back_off(lived=0.0) <= 1.2 * BACKOFF_FIRST


def test_a_restart_becomes_due_once_its_back_off_is_over(children: list[ChildProcess]) -> None:
    child = ChildProcess(1)
    children.append(child)
    child.spawn(lambda: 1)
    reaped(child)
    wait = child.back_off(lived=0.0)

    assert not child.due(time.monotonic())
    time.sleep(wait)
    assert child.due(time.monotonic())
    child.hold()
    assert not child.due(time.monotonic())
    assert child.restart_at is None


def test_a_fork_that_fails_raises_and_leaves_the_place_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    child = ChildProcess(1)
    open_before = len(os.listdir("/proc/self/fd"))

    with pytest.raises(OSError, match="temporarily unavailable"):
        child.spawn_reporting(lambda fd: 0)

    assert (child.pid, child.spawns, child.status_fd) == (None, 0, None)
    assert len(os.listdir("/proc/self/fd")) == open_before  # the pipe was closed again


def test_a_worker_reports_ready_through_its_status_pipe_and_counts_as_started(
    children: list[ChildProcess],
) -> None:
    child = ChildProcess(1)
    children.append(child)

    def body(fd: int) -> int:
        status_pipe.report(fd, "not-ready connecting")
        status_pipe.report(fd, "ready")
        return 0

    pid = child.spawn_reporting(body)
    assert child.state == "starting"
    ended = reaped(child)

    assert [(r.kind, r.detail, r.first) for r in ended.reports] == [
        ("not-ready", "connecting", False),
        ("ready", "", True),
    ]
    assert ended.pid == pid
    assert child.state == "ready"
    assert child.status_fd is None  # closed with the process
    assert not child.started  # a reaped place has no started worker


def test_a_start_up_error_reported_before_ready_is_rebuilt_with_its_class(
    children: list[ChildProcess],
) -> None:
    child = ChildProcess(1)
    children.append(child)

    def body(fd: int) -> int:
        status_pipe.report_error(fd, "BrokerUnreachable", "connection refused")
        return 1

    child.spawn_reporting(body)
    reaped(child)

    assert isinstance(child.boot_error, BrokerUnreachable)
    assert str(child.boot_error) == "connection refused"
    child.spawn_reporting(lambda fd: 0)
    assert child.boot_error is None  # a new process starts with a clean slate
    assert child.spawns == 2


def test_a_child_handed_down_by_a_reload_keeps_its_pid_pipe_and_reported_state(
    children: list[ChildProcess],
) -> None:
    read_fd, write_fd = os.pipe()
    status_pipe.report(write_fd, "paused")
    os.close(write_fd)
    pid = ChildProcess(9).spawn(sleeper(ignore_term=False))

    child = ChildProcess.adopt(2, pid, read_fd, "ready")
    children.append(child)

    assert (child.number, child.pid, child.status_fd) == (2, pid, read_fd)
    assert child.started and child.ready
    assert [(r.kind, r.first) for r in child.read_reports()] == [("paused", False)]
    assert (child.state, child.ready) == ("paused", False)
    assert child.status_fd is None  # end of file: the pipe is closed
    assert child.stop()


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _sigterm_ignored(pid: int) -> bool:
    try:
        return bool(int(_status_fields(pid)["SigIgn"], 16) & (1 << (signal.SIGTERM - 1)))
    except (FileNotFoundError, KeyError):
        return False


def _signals_unblocked(pid: int) -> bool:
    try:
        return int(_status_fields(pid)["SigBlk"], 16) == 0
    except (FileNotFoundError, KeyError):
        return False
