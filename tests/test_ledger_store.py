"""What the ledger writes and how it reads back, without a broker: one row per attempt,
retention per outcome, lost workers, and the `jobs` and `workers` commands; on SQLite and on
the real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from typer.testing import CliRunner

from listener import jobs
from listener.cli import app
from listener.database import create_engine
from listener.ledger import (
    LostAttempt,
    attempts,
    gaps,
    prune,
    record_lost,
    report_worker,
    workers,
    write_batch,
)
from listener.recorder import AttemptRecord, Gap, WorkerBeat

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def record(
    message_id: str, attempt: int, outcome: str, at: dt.datetime, **fields: Any
) -> AttemptRecord:
    finished = None if outcome in ("running", "pending") else at + dt.timedelta(seconds=0.25)
    return AttemptRecord(
        message_id,
        "app:Orders",
        "orders",
        attempt,
        outcome,
        "host-a",
        100,
        at,
        finished_at=finished,
        duration=0.25 if finished else None,
        **fields,
    )


def write(
    engine: Engine, *records: AttemptRecord, open_: set[Any] | None = None, gap: Gap | None = None
) -> set[Any]:
    with engine.begin() as connection:
        return write_batch(connection, records, open_attempts=open_ or set(), gap=gap)


def rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(attempts)).scalar_one())


def test_an_attempt_that_starts_and_ends_in_one_batch_is_one_row(engine: Engine) -> None:
    start = record("m1", 1, "running", NOW)
    end = record("m1", 1, "handled", NOW)
    assert write(engine, start, end) == set()
    assert rows(engine) == 1
    [job] = jobs.show("m1", engine=engine)
    assert job.state == "handled"


def test_an_attempt_written_as_running_is_closed_in_place_by_its_end(engine: Engine) -> None:
    start = record("m1", 1, "running", NOW)
    still_open = write(engine, start)
    assert jobs.show("m1", engine=engine)[0].state == "running"
    assert (
        write(engine, record("m1", 1, "parked", NOW, next_queue="orders.dead"), open_=still_open)
        == set()
    )
    assert rows(engine) == 1
    [job] = jobs.show("m1", engine=engine)
    assert (job.state, job.where) == ("parked", "orders.dead")


def test_long_exception_texts_are_cut_and_a_traceback_keeps_its_end(engine: Engine) -> None:
    write(
        engine,
        record(
            "m1",
            1,
            "parked",
            NOW,
            exception_type="E",
            exception_message="x" * 5000,
            traceback="start " + "y" * 10_000 + " the end",
        ),
    )
    [attempt] = jobs.show("m1", engine=engine)[0].attempts
    assert attempt.exception_message is not None and len(attempt.exception_message) == 500
    assert attempt.traceback is not None and attempt.traceback.endswith(" the end")
    assert len(attempt.traceback) == 4000


def test_retention_drops_handled_messages_after_days_and_keeps_failed_ones_longer(
    engine: Engine,
) -> None:
    old = NOW - 5 * DAY
    write(
        engine,
        record("handled-old", 1, "retried", old),
        record("handled-old", 2, "handled", old),
        record("parked-old", 1, "parked", old, tags=("Account:1",)),
        record("handled-new", 1, "handled", NOW),
        record("parked-ancient", 1, "parked", NOW - 40 * DAY),
    )
    with engine.begin() as connection:
        deleted = prune(connection, handled_before=NOW - 3 * DAY, failed_before=NOW - 30 * DAY)
    assert deleted == 2
    left = {job.message_id for job in jobs.find(engine=engine)}
    assert left == {"parked-old", "handled-new"}
    assert jobs.find(tag="Account:1", engine=engine)[0].message_id == "parked-old"
    with engine.begin() as connection:
        assert prune(connection, handled_before=NOW - 3 * DAY, failed_before=NOW - 30 * DAY) == 0


def test_a_lost_worker_turns_its_running_attempt_into_worker_lost(engine: Engine) -> None:
    write(engine, record("m1", 1, "running", NOW - dt.timedelta(seconds=2)))
    lost = LostAttempt("m1", "app:Orders", "orders", "host-a", 100, NOW - dt.timedelta(seconds=2))
    assert record_lost(engine, [lost]) == 1
    [job] = jobs.show("m1", engine=engine)
    [attempt] = job.attempts
    assert (attempt.attempt, attempt.outcome, job.state) == (1, "worker_lost", "retrying")
    assert rows(engine) == 1


def test_a_worker_that_died_running_a_message_leaves_the_workers_view_at_once(
    engine: Engine,
) -> None:
    started = NOW - dt.timedelta(seconds=2)
    running = [{"message_id": "m1", "listener": "app:Orders", "since": started.isoformat()}]
    with engine.begin() as connection:
        report_worker(connection, "host-a", 100, WorkerBeat(("app:Orders",), NOW, running, 0, 0, 0))
        report_worker(connection, "host-a", 101, WorkerBeat(("app:Orders",), NOW, [], 0, 0, 0))
    record_lost(engine, [LostAttempt("m1", "app:Orders", "orders", "host-a", 100, started)])
    # Not "busy with m1" until it has been silent for 30 s: the message runs elsewhere now.
    assert [(w.host, w.pid) for w in jobs.workers(engine=engine)] == [("host-a", 101)]


def test_a_second_death_of_one_message_is_its_next_attempt(engine: Engine) -> None:
    first = LostAttempt(
        "m1", "app:Orders", "orders", "host-a", 100, NOW - 2 * dt.timedelta(seconds=5)
    )
    second = LostAttempt("m1", "app:Orders", "orders", "host-b", 200, NOW)
    record_lost(engine, [first])
    record_lost(engine, [second])
    [job] = jobs.show("m1", engine=engine)
    assert [(a.attempt, a.host) for a in job.attempts] == [(1, "host-a"), (2, "host-b")]


# -- the commands ------------------------------------------------------------------------------


def invoke(database_url: str, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--database-url", database_url])


def test_jobs_show_tells_the_story_and_where_the_message_is_now(
    engine: Engine, database_url: str
) -> None:
    write(
        engine,
        record("m1", 0, "pending", NOW, tags=("Case:4",)),
        record(
            "m1",
            1,
            "retried",
            NOW,
            next_queue="orders.retry.1s",
            exception_type="OSError",
            exception_message="disk full",
        ),
        record(
            "m1",
            2,
            "parked",
            NOW + DAY / 1000,
            next_queue="orders.dead",
            exception_type="OSError",
            exception_message="disk full",
        ),
    )
    result = invoke(database_url, "jobs", "show", "m1")
    assert result.exit_code == 0, result.output
    assert "state: parked   now: orders.dead" in result.output
    assert "published" in result.output
    assert "OSError: disk full" in result.output
    assert "Case:4" in result.output
    document = json.loads(invoke(database_url, "jobs", "show", "m1", "--json").output)
    assert [a["outcome"] for a in document["jobs"][0]["attempts"]] == [
        "published",
        "retried",
        "parked",
    ]


def test_a_message_waiting_for_its_retry_is_retrying_in_its_delay_queue_and_unfinished(
    engine: Engine, database_url: str
) -> None:
    write(
        engine,
        record("m1", 0, "pending", NOW, tags=("Case:5",)),
        record("m1", 1, "retried", NOW, next_queue="orders.retry.2s", exception_type="OSError"),
        record("m2", 0, "pending", NOW, tags=("Case:5",)),
        record("m2", 1, "handled", NOW),
    )
    [job] = jobs.show("m1", engine=engine)
    assert (job.state, job.where) == ("retrying", "orders.retry.2s")
    unfinished = jobs.find(tag="Case:5", state=jobs.UNFINISHED, engine=engine)
    assert [found.message_id for found in unfinished] == ["m1"]
    result = invoke(database_url, "jobs", "show", "m1")
    assert "state: retrying   now: orders.retry.2s" in result.output
    listed = json.loads(
        invoke(
            database_url, "jobs", "list", "--tag", "Case:5", "--state", "retrying", "--json"
        ).output
    )
    assert [found["message_id"] for found in listed["jobs"]] == ["m1"]


def test_jobs_show_of_an_unknown_id_fails_and_names_a_gap_that_may_explain_it(
    engine: Engine, database_url: str
) -> None:
    write(
        engine,
        gap=Gap("host-a", 100, NOW - dt.timedelta(minutes=5), NOW - dt.timedelta(minutes=4), 42),
    )
    result = invoke(database_url, "jobs", "show", "nope")
    assert result.exit_code == 1
    assert "no record of message nope" in result.output
    assert "gap: 42 record(s) dropped between" in result.output
    as_json = invoke(database_url, "jobs", "show", "nope", "--json")
    assert as_json.exit_code == 1
    document = json.loads(as_json.stdout)
    assert (document["jobs"], document["gaps"][0]["dropped"]) == ([], 42)
    [line] = as_json.stderr.splitlines()
    assert "no record of message nope" in line


def test_jobs_list_filters_by_tag_and_state_and_runs_oldest_first(
    engine: Engine, database_url: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    write(
        engine,
        record("a", 1, "parked", now - dt.timedelta(minutes=3), tags=("Account:1",)),
        record("b", 1, "handled", now - dt.timedelta(minutes=2), tags=("Account:1",)),
        record("c", 1, "parked", now - dt.timedelta(minutes=1), tags=("Account:1",)),
        record("d", 1, "parked", now, tags=("Account:2",)),
    )
    document = json.loads(
        invoke(
            database_url, "jobs", "list", "--tag", "Account:1", "--state", "parked", "--json"
        ).output
    )
    assert [job["message_id"] for job in document["jobs"]] == ["a", "c"]
    limited = json.loads(
        invoke(database_url, "jobs", "list", "orders", "--limit", "2", "--json").output
    )
    assert [job["message_id"] for job in limited["jobs"]] == ["c", "d"]
    recent = json.loads(invoke(database_url, "jobs", "list", "--since", "90s", "--json").output)
    assert [job["message_id"] for job in recent["jobs"]] == ["c", "d"]


@pytest.mark.parametrize("args", [["--state", "done"], ["--since", "yesterday"], ["--limit", "0"]])
def test_jobs_list_refuses_a_bad_option_value_with_exit_2(
    database_url: str, args: list[str]
) -> None:
    assert invoke(database_url, "jobs", "list", *args).exit_code == 2


def test_jobs_list_of_an_unknown_target_is_a_usage_error(database_url: str) -> None:
    result = invoke(database_url, "jobs", "list", "app:Nobody")
    assert result.exit_code == 2
    assert "no job of 'app:Nobody'" in result.output


def test_workers_counts_live_busy_workers_and_shows_silent_ones_as_lost(
    engine: Engine, database_url: str
) -> None:
    beat = WorkerBeat(("app:Orders",), NOW, [], 3, 1, 0)
    busy = WorkerBeat(
        ("app:Orders",),
        NOW,
        [{"message_id": "m9", "listener": "app:Orders", "since": NOW.isoformat()}],
        0,
        0,
        0,
    )
    with engine.begin() as connection:
        report_worker(connection, "host-a", 1, busy)
        report_worker(connection, "host-b", 2, beat)
        report_worker(connection, "host-c", 3, busy)
        connection.execute(
            workers.update().where(workers.c.pid == 3).values(seen_at=NOW - dt.timedelta(minutes=1))
        )
    document = json.loads(invoke(database_url, "workers", "--json").output)
    assert (document["busy"], document["total"]) == (1, 2)
    states = {worker["host"]: worker["state"] for worker in document["workers"]}
    assert states == {"host-a": "busy", "host-b": "idle", "host-c": "lost"}
    table = invoke(database_url, "workers").output
    assert table.splitlines()[0] == "1 of 2 workers busy"
    assert "m9" in table


def test_old_gaps_are_pruned_with_the_failed_records_of_their_time(engine: Engine) -> None:
    write(engine, gap=Gap("h", 1, NOW - 40 * DAY, NOW - 40 * DAY, 5))
    with engine.begin() as connection:
        prune(connection, handled_before=NOW - 3 * DAY, failed_before=NOW - 30 * DAY)
        assert connection.execute(select(func.count()).select_from(gaps)).scalar_one() == 0


def test_a_running_job_whose_worker_stopped_reporting_says_so_instead_of_running_on(
    engine: Engine,
) -> None:
    write(engine, record("m1", 1, "running", NOW))
    [job] = jobs.show("m1", engine=engine)
    assert job.state == "running"
    assert job.where.startswith("unknown: its worker, host-a pid 100, stopped reporting")
    with engine.begin() as connection:
        report_worker(connection, "host-a", 100, WorkerBeat(("app:Orders",), NOW, [], 0, 0, 0))
    assert jobs.show("m1", engine=engine)[0].where == "being handled on host-a pid 100"


def test_a_replayed_message_that_was_then_handled_shows_handled_after_its_parking(
    engine: Engine, database_url: str
) -> None:
    # A replay resets the attempt count: the replayed delivery is attempt 1 again.
    write(
        engine,
        record("m1", 0, "pending", NOW - dt.timedelta(minutes=10), tags=("Case:7",)),
        record("m1", 1, "retried", NOW - dt.timedelta(minutes=10), next_queue="orders.retry.1s"),
        record("m1", 2, "parked", NOW - dt.timedelta(minutes=9), next_queue="orders.dead"),
        record("m1", 1, "handled", NOW - dt.timedelta(minutes=1)),
    )
    [job] = jobs.show("m1", engine=engine)
    assert [(a.attempt, a.outcome) for a in job.attempts] == [
        (0, "pending"),
        (1, "retried"),
        (2, "parked"),
        (1, "handled"),
    ]
    assert (job.state, job.where) == ("handled", "nowhere (acked)")
    [found] = jobs.find(tag="Case:7", engine=engine)
    assert found.state == "handled"
    assert jobs.find(tag="Case:7", state="parked", engine=engine) == []
    assert jobs.find(state="parked", engine=engine) == []


def test_retention_is_not_held_up_by_handled_messages_kept_for_a_parked_record(
    engine: Engine,
) -> None:
    old = NOW - 5 * DAY
    kept = [
        record(f"replayed-{n}", attempt, outcome, old + dt.timedelta(seconds=attempt))
        for n in range(3)
        for attempt, outcome in ((1, "parked"), (2, "handled"))
    ]
    write(engine, *kept, record("handled-old", 1, "handled", old + dt.timedelta(hours=1)))
    with engine.begin() as connection:
        deleted = prune(
            connection, handled_before=NOW - 3 * DAY, failed_before=NOW - 30 * DAY, batch=2
        )
    assert deleted == 1
    left = {job.message_id for job in jobs.find(engine=engine)}
    assert left == {"replayed-0", "replayed-1", "replayed-2"}
