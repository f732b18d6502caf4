"""`python -m bench` (`make bench`) keeps working: every case runs, checks out and cleans up.

A benchmark, not a test of speed: nothing here asserts a time or a ratio's size, only that
each case produced a number, that its runs were checked against the broker, and that
nothing named `bench-` outlives the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Every row the table has, baselines included.
ROWS = (
    "raw",
    "raw-uvloop",
    "pika-select",
    "async",
    "sync",
    "pydantic",
    "workers2",
    "async-ledger-pg",
    "async-ledger-sqlite",
    "pika-serial",
    "notify",
    "notify-ledger",
    "notify-delayed",
    "aio-pika-pipelined",
    "aio-pika-pipelined-uvloop",
    "notify-many",
    "anotify-many",
    "latency-raw-p50",
    "latency-raw-p99",
    "latency-p50",
    "latency-p99",
    "rss-raw",
    "rss-async",
    "rss-workers2",
)
#: The framework's cases and their baselines (the peer rows have a test of their own).
OWN_CASES = (
    "raw,raw-uvloop,pika-select,async,sync,pydantic,workers2,async-ledger-pg,"
    "async-ledger-sqlite,pika-serial,notify,notify-ledger,notify-delayed,aio-pika-pipelined,"
    "aio-pika-pipelined-uvloop,notify-many,anotify-many,latency-raw,latency"
)
#: The other frameworks' rows (the `bench` extra), for the consume and the serial job.
PEER_ROWS = (
    "faststream",
    "dramatiq",
    "celery",
    "faststream-publish",
    "dramatiq-publish",
    "celery-publish",
)
GOALS = {
    "async",
    "sync",
    "workers2",
    "async-ledger-pg",
    "async-ledger-sqlite",
    "notify",
    "notify-ledger",
    "notify-delayed",
    "notify-many",
    "anotify-many",
    "latency-p99",
}
SERIAL = {
    "pika-serial",
    "notify",
    "notify-ledger",
    "notify-delayed",
    *(row for row in PEER_ROWS if row.endswith("-publish")),
}


def bench(*args: str, url: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run `python -m bench ARGS` against `url`; past `timeout`, stop it the way Ctrl-C
    would (it then stops what it started and deletes its queues) and fail."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMQP_LISTENER_")}
    env["AMQP_URL"] = url
    argv = [sys.executable, "-m", "bench", *args]
    with subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
            pytest.fail(f"the bench ran over {timeout:g}s; its progress:\n{stderr}")
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def assert_nothing_left(url: str, cases: dict[str, Any]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for case in cases.values():
            for declared in case["declared"]:
                for name in declared["queues"]:
                    channel = connection.channel()
                    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
                        channel.queue_declare(name, passive=True)
                if declared["exchange"] is None:  # a peer that uses the default exchange
                    continue
                channel = connection.channel()
                with pytest.raises(pika.exceptions.ChannelClosedByBroker):
                    channel.exchange_declare(declared["exchange"], passive=True)
    finally:
        connection.close()


def test_an_unknown_case_is_refused_with_the_list_of_cases() -> None:
    done = bench("--cases", "async,nonsense", url="amqp://guest:guest@127.0.0.1:1/%2F")
    assert done.returncode == 2
    assert "unknown case(s) nonsense" in done.stderr
    assert "raw-uvloop" in done.stderr


def test_an_unreachable_broker_ends_the_bench_with_one_line_and_no_password() -> None:
    done = bench("--cases", "raw", url="amqp://bench:s3cret@127.0.0.1:1/%2F")
    assert done.returncode == 1
    assert "cannot reach RabbitMQ at amqp://bench:***@127.0.0.1:1/%2F" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout


@pytest.mark.slow
def test_a_case_past_its_time_bound_is_reported_as_timed_out_and_leaves_nothing(
    amqp_url: str,
) -> None:
    # 2,000 messages cannot be pre-filled, consumed and checked in half a second.
    done = bench(
        "--cases",
        "async",
        "--n",
        "2000",
        "--repeats",
        "2",
        "--case-timeout",
        "0.5",
        "--json",
        url=amqp_url,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    for case_id in ("raw", "async"):
        case = document["cases"][case_id]
        assert case["status"] == "timed out"
        assert case["runs"] == []
        assert len(case["declared"]) == 1  # the second repeat is not attempted
    rows = {row["id"]: row for row in document["rows"]}
    assert rows["async"]["value"] is None
    assert rows["async"]["ratio"] is None
    assert "timed out" in done.stderr
    assert_nothing_left(amqp_url, document["cases"])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_every_case_runs_checks_out_and_cleans_up_with_a_small_n(amqp_url: str) -> None:
    done = bench(
        "--cases",
        OWN_CASES,
        "--n",
        "200",
        "--repeats",
        "1",
        "--case-timeout",
        "30",
        "--json",
        url=amqp_url,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["header"]["n"] == 200
    for case_id, case in document["cases"].items():
        assert case["status"] == "ok", (case_id, case["error"])
    rows = {row["id"]: row for row in document["rows"]}
    assert sorted(rows) == sorted(ROWS)
    for row_id, row in rows.items():
        assert isinstance(row["value"], float) and row["value"] > 0, row_id
        assert isinstance(row["ratio"], float) and row["ratio"] > 0, row_id
        assert (row["goal"] is not None) == (row_id in GOALS), row_id
        assert isinstance(row["met"], bool) == (row_id in GOALS), row_id
    for case_id, case in document["cases"].items():
        # One run per repeat; the one-at-a-time publish group runs three per repeat.
        runs = case["runs"]
        assert len(runs) == (3 if case_id in SERIAL else 1), case_id
        for run in runs:
            assert run["messages"] == 200
            if "in_queue" in run:  # a publisher: the warm-up message and the 200 timed ones
                assert run["in_queue"] == 201, case_id
            else:  # a consumer: exactly one handler call per message
                assert run["handled"] == 200, case_id
    workers = document["cases"]["workers2"]["runs"][0]
    assert sum(workers["per_process"].values()) == 200
    assert_nothing_left(amqp_url, document["cases"])


@pytest.mark.slow
@pytest.mark.skipif(
    not all(find_spec(name) for name in ("faststream", "dramatiq", "celery")),
    reason="the peers are not installed: pip install -e '.[bench]' (make bench does)",
)
def test_the_peer_rows_run_check_out_and_clean_up_beside_their_baselines(amqp_url: str) -> None:
    done = bench(
        "--cases",
        ",".join(PEER_ROWS),
        "--n",
        "200",
        "--repeats",
        "1",
        "--case-timeout",
        "40",
        "--json",
        url=amqp_url,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    celery = document["cases"].pop("celery")
    if celery["status"] != "ok":
        # Celery's worker can stop with the acks of its last tasks unsent (README,
        # Performance): the check must catch exactly that, and nothing else may go wrong.
        assert celery["status"] == "failed", celery["error"]
        assert "(unacked or handed back) and 0 are parked" in celery["error"]
    for case_id, case in document["cases"].items():
        assert case["status"] == "ok", (case_id, case["error"])
    rows = {row["id"]: row for row in document["rows"]}
    memory = ["rss-raw", "rss-faststream", "rss-dramatiq", "rss-celery"]
    assert sorted(rows) == sorted([*PEER_ROWS, "raw", "pika-serial", *memory])
    for row_id in (r for r in PEER_ROWS if rows[r]["status"] == "ok"):
        assert rows[row_id]["baseline"] == ("pika-serial" if row_id in SERIAL else "raw")
        assert isinstance(rows[row_id]["ratio"], float) and rows[row_id]["ratio"] > 0, row_id
        assert rows[row_id]["goal"] is None  # information: no goal is set against a peer
    for case_id in document["cases"].keys() & PEER_ROWS:
        for run in document["cases"][case_id]["runs"]:
            if case_id in SERIAL:  # the warm-up message and the 200 timed ones
                assert run["in_queue"] == 201, case_id
            else:  # exactly one handler call per pre-filled message
                assert run["handled"] == 200, case_id
    assert_nothing_left(amqp_url, {**document["cases"], "celery": celery})


@pytest.mark.slow
def test_the_profile_counts_python_calls_per_message_for_both_consumers(amqp_url: str) -> None:
    done = bench("--profile", "--n", "300", "--case-timeout", "30", "--json", url=amqp_url)
    assert done.returncode == 0, done.stderr
    profile = json.loads(done.stdout)["profile"]
    assert sorted(profile) == ["async", "raw"]
    for summary in profile.values():
        assert summary["messages"] == 299  # from the first handler call to the 300th
        assert summary["calls_per_message"] == summary["calls"] / 299 > 0
        assert len(summary["top"]) == 15
        counts = [entry["ncalls"] for entry in summary["top"]]
        assert counts == sorted(counts, reverse=True)
    # The framework's hot path, in Python calls per consumed message (145 when this was set):
    # a change that makes every message cost more calls shows up here.
    assert profile["async"]["calls_per_message"] < 189
