"""Poison messages beside innocent ones, and interruptions that are nobody's fault.

Blame (listener/runner/blame.py) charges a worker's death to a message only when that
message was the only one running; the messages beside it run alone once each and go on.
Every test runs at the listener defaults (max_attempts 5, concurrency 8) unless the fault
needs otherwise, and counts lost, duplicated and wrongly parked messages.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from faults.harness import Fault, Runner, wait_until
from faults.node import RabbitNode

pytestmark = pytest.mark.slow

MAX_ATTEMPTS = 5  # the listener default
INNOCENTS = 7


def parked_headers(fault: Fault) -> dict[str, list[dict[str, Any]]]:
    """Take every parked message: the headers of each copy, by message id."""
    parked: dict[str, list[dict[str, Any]]] = {}
    connection = pika.BlockingConnection(pika.URLParameters(fault.node.url))
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(fault.dead, auto_ack=True)
            if method is None:
                break
            message_id = str(json.loads(body)["id"])
            parked.setdefault(message_id, []).append(properties.headers or {})
    finally:
        connection.close()
    for message_id, copies in parked.items():
        fault.parked[message_id] += len(copies)
    return parked


def send(fault: Fault, message_id: str, **fields: Any) -> None:
    publisher = fault.publishers[0] if fault.publishers else fault.publisher()
    assert fault.send(publisher, message_id, **fields), f"{message_id} was not confirmed"


@pytest.fixture
def oom_cgroup(unique: str) -> Iterator[Path]:
    """A cgroup v1 memory group capped at 64 MiB that a worker can move itself into."""
    group = Path("/sys/fs/cgroup/memory") / f"amqp-listener-{unique}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(64 * 1024 * 1024))
        with contextlib.suppress(OSError):
            (group / "memory.memsw.limit_in_bytes").write_text(str(64 * 1024 * 1024))
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        pytest.skip(f"cannot make a memory cgroup for the OOM poison ({exc}); needs root and v1")
    try:
        yield group
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


POISONS = {"exit": "os._exit", "segv": "SIGSEGV", "abort": "os.abort", "oom": "OOM"}


@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
@pytest.mark.parametrize("poison", list(POISONS), ids=list(POISONS.values()))
def test_a_poison_message_beside_seven_innocents_is_parked_alone_and_they_are_all_handled(
    fault, request, poison, workers
):
    env: dict[str, str] = {}
    if poison == "oom":
        env["FAULT_OOM_CGROUP"] = str(request.getfixturevalue("oom_cgroup"))
    fault.declare()
    for n in range(INNOCENTS):
        send(fault, f"innocent-{n}", sleep=0.5)
    send(fault, "poison", poison=poison)
    runner = fault.start_runner(workers=workers, ready=False, **env)

    parked: dict[str, list[dict[str, Any]]] = {}

    def settled() -> bool:
        for message_id, copies in parked_headers(fault).items():
            parked.setdefault(message_id, []).extend(copies)
        return "poison" in parked and len(fault.handled()) >= INNOCENTS

    wait_until(settled, 120, "the poison parked and the innocents handled", step=0.5)
    runs = fault.events()["start"]["poison"]
    verdict = fault.verdict(
        f"P1 {POISONS[poison]} poison beside {INNOCENTS} innocents, --workers {workers}",
        recovery_s=None,
        notes=f"innocents parked {len(set(parked) - {'poison'})}; poison parked "
        f"{len(parked.get('poison', []))} time(s) after {runs} runs; "
        f"{len(runner.deaths())} worker deaths",
    )

    verdict.assert_nothing_lost()
    assert set(parked) == {"poison"}, f"innocents parked: {sorted(parked)}"
    assert fault.parked == {"poison": 1}, f"parked late: {dict(fault.parked)}"
    [headers] = parked["poison"]  # parked exactly once
    assert headers["x-parked-reason"] == "worker_lost", headers
    # Blamed deaths (and failures a worker saw, as a MemoryError) count as attempts.
    assert MAX_ATTEMPTS <= headers["x-attempts"] <= runs, headers
    assert MAX_ATTEMPTS <= runs <= 2 * MAX_ATTEMPTS, f"the poison ran {runs} times"
    assert len(runner.deaths()) == runs, runner.stderr[-3000:]
    handled = fault.handled()
    assert all(handled[f"innocent-{n}"] == 1 for n in range(INNOCENTS)), handled
    assert "blamed on it" in runner.stderr


def test_a_poison_that_takes_the_whole_runner_down_is_parked_at_the_delivery_limit(fault):
    # An OOM kill of a container, a `kill` of the process group: the supervisor dies too,
    # and with it everything blame knew. The delivery limit (3 x max_attempts) still ends it,
    # and the innocents beside it, redelivered each time with it, run alone in a random
    # order once delivered twice without an outcome: each is handled, none is parked.
    fault.declare()
    send(fault, "poison", poison="runner")  # first in the queue: it would run first each time
    for n in range(INNOCENTS):
        send(fault, f"innocent-{n}", sleep=0.5)
    starts = 0
    parked: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + 150
    while "poison" not in parked:
        assert time.monotonic() < deadline, f"not parked after {starts} runner starts"
        runner = fault.start_runner(workers=1, ready=False)
        starts += 1

        def over(runner: Runner = runner) -> bool:
            for message_id, copies in parked_headers(fault).items():
                parked.setdefault(message_id, []).extend(copies)
            return runner.exited or "poison" in parked

        wait_until(over, 30, "the runner to die or the poison to be parked", step=0.2)
    wait_until(lambda: len(fault.handled()) >= INNOCENTS, 60, "the innocents handled", step=0.5)
    runner.kill()
    runs = fault.events()["start"]["poison"]
    reasons = [copy.get("x-parked-reason") for copy in parked["poison"]]
    verdict = fault.verdict(
        f"P2 poison killing the whole runner, beside {INNOCENTS} innocents",
        recovery_s=None,
        notes=f"innocents parked {len(set(parked) - {'poison'})}; poison parked "
        f"{len(reasons)} time(s) as {', '.join(map(str, reasons))} after {runs} deliveries "
        f"without an outcome; {starts} runner starts",
    )

    verdict.assert_nothing_lost()
    assert set(parked) == {"poison"}, f"innocents parked: {sorted(parked)}"
    handled = fault.handled()
    assert all(handled[f"innocent-{n}"] >= 1 for n in range(INNOCENTS)), handled
    [headers] = parked["poison"]
    assert headers["x-parked-reason"] == "delivery_limit", headers
    assert runs == 3 * MAX_ATTEMPTS, f"ran {runs} times"
    assert "max_deliveries=15" in headers["x-exception-message"]


def test_pauses_reloads_and_forced_closes_with_max_attempts_1_park_nothing_and_lose_nothing(
    fault, node: RabbitNode
):
    runner = fault.start_runner(workers=2, FAULT_MAX_ATTEMPTS="1")
    total = 1500
    interruptions: Counter[str] = Counter()

    def after(handled: int) -> None:
        wait_until(lambda: fault.handled_count() >= handled, 60, f"{handled} handled")

    with fault.publishing(total, sleep=0.01, interval=0.002, timeout=120):
        for round_, handled in enumerate((100, 250, 400, 550), start=1):
            after(handled)
            runner.signal(signal.SIGUSR2)
            runner.wait_log("pausing (received SIGUSR2)", count=2 * round_)
            runner.signal(signal.SIGCONT)
            interruptions["pause"] += 1
        for round_, handled in enumerate((700, 850), start=1):
            after(handled)
            runner.signal(signal.SIGHUP)
            runner.wait_log(" reloaded: ", count=round_, timeout=60)
            interruptions["reload"] += 1
        for round_, handled in enumerate((1000, 1150, 1300), start=1):
            after(handled)
            node.ctl("close_all_connections", "fault suite P3")
            wait_until(
                lambda r=round_: runner.stderr.count("reconnected to ") >= 2 * r, 30, "reconnects"
            )
            interruptions["forced close"] += 1
    fault.wait_settled(60)

    alone = runner.stderr.count("without an outcome (a runner or a connection lost)")
    verdict = fault.verdict(
        "P3 4 pauses, 2 reloads, 3 forced closes, max_attempts 1",
        recovery_s=None,
        notes=", ".join(f"{n} {what}" for what, n in interruptions.items())
        + f"; {alone} message(s) redelivered twice ran alone once",
    )
    verdict.assert_nothing_lost()
    assert verdict.confirmed == total
    assert verdict.parked == 0, f"parked for interruptions: {dict(fault.parked)}"
    assert interruptions == {"pause": 4, "reload": 2, "forced close": 3}
    assert runner.deaths() == []
    # Nothing here is anyone's fault: no message was made a suspect. Only a message that a
    # forced close caught twice in flight may run alone, once: never the in-flight set.
    assert "was running when a worker died" not in runner.stderr
    assert alone <= 100, f"{alone} of {total} messages ran alone after the forced closes"
