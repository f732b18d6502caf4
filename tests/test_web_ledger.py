"""The web console with the job ledger, over HTTP, against the real broker and the real
PostgreSQL ledger: refusals and missing pieces first (no ledger, an unreachable one, an
unknown message), then the Workers page, a real worker's jobs searched and told as a
timeline, the last hour's charts, the schedules and the delayed counts."""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from sqlalchemy.engine import make_url
from starlette.testclient import TestClient
from support.databases import empty_ledger
from support.waiting import eventually, wait_until
from support.web import console_app, declared_listener

from listener import Listener, delay, jobs
from listener._web_data import LedgerSource, NoLedger, job_source
from listener.ledger import report_worker, workers
from listener.recorder import WorkerBeat, recorder_for
from listener.recording import LedgerMiddleware
from listener.scheduler import queue_arguments, state_queue
from listener.settings import Settings, get_settings

NOW = dt.datetime.now(dt.UTC)
CLI = str(Path(sys.executable).with_name("amqp-listener"))


@pytest.fixture
def ledger(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[LedgerSource]:
    """The session's PostgreSQL ledger, emptied; this process publishes with its URL set."""
    empty_ledger(postgres_url)
    monkeypatch.setenv("AMQP_LISTENER_DATABASE_URL", postgres_url)
    get_settings.cache_clear()
    source = LedgerSource(postgres_url, ttl=0)
    yield source
    source.close()
    recorder_for(postgres_url).close()
    get_settings.cache_clear()


class Order(BaseModel):
    account: int
    fail: bool = False


def order_listener(unique: str) -> type[Listener]:
    class Orders(Listener):
        subscribes_to = f"{unique}.order"
        queue = f"{unique}.orders"
        max_attempts = 2
        retry_delays = (0.05,)

        def handle(self, message: Order) -> None:
            if message.fail:
                raise RuntimeError("the card was declined")

        def track(self, message: Order) -> Iterable[str]:
            return [f"Account:{message.account}"]

    return Orders


def cells(page: str, table_id: str) -> list[str]:
    """The text of each row of one table, tags stripped (what a reader sees)."""
    body = page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr.*?</tr>", body, flags=re.S)
    return [html.unescape(" ".join(re.sub(r"<[^>]+>", " ", row).split())) for row in rows[1:]]


# -- without a ledger, or with one that does not answer ---------------------------------------


def test_without_a_database_url_every_ledger_page_says_what_is_missing(settings, unique, rabbit):
    source = job_source(settings.with_database_url(None))
    assert isinstance(source, NoLedger)
    assert "--database-url" in source.missing and "db upgrade" in source.missing
    mailer = declared_listener(unique, rabbit)
    client = TestClient(console_app(settings, mailer, jobs=source)[0])

    for path in ("/workers", "/jobs", "/jobs/some-id"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert "This page needs the job ledger" in page.text, path
    overview = client.get("/")
    assert "No charts: This page needs the job ledger" in overview.text
    assert "<svg" not in overview.text


def test_an_unreachable_ledger_is_a_502_naming_it_without_its_password_but_the_overview_stays(
    settings, unique, rabbit
):
    source = LedgerSource("postgresql://ops:s3cret-pw@127.0.0.1:1/ledger")
    mailer = declared_listener(unique, rabbit)
    client = TestClient(console_app(settings, mailer, jobs=source)[0])
    try:
        for path in ("/workers", "/jobs?tag=Account:1", "/jobs/m1"):
            page = client.get(path)
            assert page.status_code == 502, path
            assert "the job ledger did not answer" in page.text
            assert "127.0.0.1:1" in page.text
            assert "s3cret-pw" not in page.text
        overview = client.get("/")  # the broker's counts still show; only the charts are gone
        assert overview.status_code == 200
        assert f'<tr data-queue="{mailer.queue}">' in overview.text
        assert "No charts: the job ledger did not answer" in overview.text
        assert "s3cret-pw" not in overview.text
    finally:
        source.close()


def test_an_unknown_message_is_a_404_and_an_unknown_state_a_400(settings, ledger, unique, rabbit):
    client = TestClient(console_app(settings, declared_listener(unique, rabbit), jobs=ledger)[0])

    unknown = client.get("/jobs/no-such-message")
    assert unknown.status_code == 404
    assert "no record of message 'no-such-message' in the ledger" in html.unescape(unknown.text)
    bad = client.get("/jobs", params={"state": "exploded"})
    assert bad.status_code == 400
    assert "state must be one of pending, running, retrying, handled, parked" in bad.text


# -- workers ------------------------------------------------------------------------------------


def test_the_workers_page_counts_busy_live_workers_and_marks_silent_ones_lost(
    settings, ledger, unique, rabbit
):
    idle = WorkerBeat(("app:Orders",), NOW, [], 3, 1, 0)
    since = NOW - dt.timedelta(seconds=42)
    running = [{"message_id": "m-busy", "listener": "app:Orders", "since": since.isoformat()}]
    busy = WorkerBeat(("app:Orders", "app:Mails"), NOW, running, 0, 0, 0)
    with ledger.engine.begin() as connection:
        report_worker(connection, "host-a", 101, busy)
        report_worker(connection, "host-b", 202, idle)
        report_worker(connection, "host-c", 303, busy)
        connection.execute(
            workers.update()
            .where(workers.c.pid == 303)
            .values(seen_at=NOW - dt.timedelta(minutes=2))
        )
    client = TestClient(console_app(settings, declared_listener(unique, rabbit), jobs=ledger)[0])

    page = client.get("/workers")

    assert page.status_code == 200
    assert '<p id="busy" class="headline">1 of 2 workers busy</p>' in page.text
    assert 'data-live="3"' in page.text  # the list refreshes by itself
    rows = re.findall(r"<tr( class=\"lost\")?>\s*<td class=\"nowrap\">(host-\w)</td>", page.text)
    assert rows == [("", "host-a"), ("", "host-b"), (' class="lost"', "host-c")]
    assert '<a class="mono" href="/jobs/m-busy">m-busy</a> app:Orders' in page.text
    assert since.strftime("%Y-%m-%d %H:%M:%S UTC") in page.text
    assert "silent since" in page.text


# -- a real worker's jobs -----------------------------------------------------------------------


async def test_a_real_workers_jobs_are_searched_told_as_a_timeline_and_charted(
    settings: Settings, ledger: LedgerSource, run_worker: Any, unique: str
) -> None:
    orders = order_listener(unique)
    url = ledger._url
    async with run_worker(orders, middleware=[LedgerMiddleware(settings.with_database_url(url))]):
        handled = await orders.anotify(account=1)
        parked = await orders.anotify(account=2, fail=True)
        for message_id, state in ((handled, "handled"), (parked, "parked")):
            await eventually(
                lambda m=message_id, s=state: any(
                    job.state == s for job in jobs.show(m, engine=ledger.engine)
                ),
                timeout=15,
            )
    assert recorder_for(url).flush()  # the publish records, from this process
    client = TestClient(console_app(settings, orders, jobs=ledger)[0])

    by_tag = cells(client.get("/jobs", params={"tag": "Account:2"}).text, "jobs")
    assert len(by_tag) == 1 and by_tag[0].startswith(f"{parked} {orders.name()} parked 2")
    assert "RuntimeError: the card was declined" in by_tag[0]
    by_state = cells(client.get("/jobs", params={"state": "handled"}).text, "jobs")
    assert [row.split()[0] for row in by_state] == [handled]
    by_listener = cells(client.get("/jobs", params={"listener": orders.name()}).text, "jobs")
    assert {row.split()[0] for row in by_listener} == {handled, parked}
    by_id = cells(client.get("/jobs", params={"message_id": handled}).text, "jobs")
    assert by_id[0].startswith(f"{handled} {orders.name()} handled 1")
    assert "nowhere (acked)" in by_id[0]

    story = client.get(f"/jobs/{parked}").text
    steps = [
        " ".join(re.sub(r"<[^>]+>", " ", li).split())
        for li in re.findall(r"<li class=.*?</li>", story, flags=re.S)
    ]
    where = f"on {socket.gethostname()} pid {os.getpid()}"
    assert steps[0].startswith(f"published {where}")
    assert steps[1].startswith(f"attempt 1: retried {where}")
    assert f"then to {orders.queue}.retry.50ms" in steps[1]
    assert steps[2].startswith(f"attempt 2: parked {where}")
    assert "took" in steps[2] and "RuntimeError : the card was declined" in steps[2]
    assert f'href="/parked/{orders.queue}/message?id={parked}">{orders.queue}.dead</a>' in story
    assert "data-live" not in story.split('id="story"')[1].split(">")[0]  # finished: no polling

    overview = client.get("/").text
    label = re.search(r'<svg [^>]*aria-label="([^"]*)"', overview)
    assert label is not None
    assert html.unescape(label.group(1)) == (
        f"{orders.name()}, last hour: 1 handled, 1 failed, 1 parked; at most 1 a minute"
    )
    assert overview.count("<rect ") == 3  # one minute, one bar per outcome


def test_an_attempt_ended_in_the_last_second_of_a_minute_counts_in_that_minute(ledger):
    from listener.ledger import write_batch
    from listener.recorder import AttemptRecord

    minute = int(dt.datetime.now(dt.UTC).timestamp()) // 60 * 60
    at = dt.datetime.fromtimestamp(minute - 0.3, dt.UTC)  # hh:mm:59.7 of the minute before
    record = AttemptRecord("late", "app:Orders", "orders", 1, "handled", "h", 1, at, at, 0.01)
    with ledger.engine.begin() as connection:
        write_batch(connection, [record], open_attempts=set(), gap=None)

    [chart] = ledger.activity()

    expected = (minute - 60 - int(chart.since.timestamp())) // 60
    assert chart.handled[expected] == sum(chart.handled) == 1


def test_the_charts_count_each_minute_of_the_last_hour_and_nothing_older(ledger):
    from listener.ledger import write_batch
    from listener.recorder import AttemptRecord

    now = dt.datetime.now(dt.UTC)

    def ended(message_id: str, outcome: str, ago: dt.timedelta) -> AttemptRecord:
        at = now - ago
        return AttemptRecord(
            message_id, "app:Orders", "orders", 1, outcome, "h", 1, at, at, duration=0.01
        )

    records = [ended(f"h{n}", "handled", dt.timedelta(seconds=1)) for n in range(3)]
    records += [
        ended("r1", "retried", dt.timedelta(minutes=30)),
        ended("p1", "parked", dt.timedelta(minutes=58, seconds=30)),
        ended("old", "handled", dt.timedelta(minutes=61)),
    ]
    with ledger.engine.begin() as connection:
        write_batch(connection, records, open_attempts=set(), gap=None)

    [chart] = ledger.activity()

    def slot(record: AttemptRecord) -> int:  # its minute, counted from the chart's first
        return (int(record.started_at.timestamp()) - int(chart.since.timestamp())) // 60

    assert chart.listener == "app:Orders"
    assert len(chart.handled) == len(chart.failed) == len(chart.parked) == 60
    assert chart.handled[slot(records[0])] == sum(chart.handled) == 3  # "old" is left out
    assert chart.failed[slot(records[3])] == sum(chart.failed) == 1
    assert chart.parked[slot(records[4])] == sum(chart.parked) == 1


# -- schedules and delayed counts ---------------------------------------------------------------


async def test_the_console_shows_schedules_with_their_last_tick_and_the_delayed_counts(
    settings: Settings, unique: str, rabbit: Any, run_worker: Any
) -> None:
    class Nightly(Listener):
        subscribes_to = f"{unique}.nightly"
        queue = f"{unique}.nightly"
        schedule = "0 3 * * *"

        def handle(self, message: dict[str, Any]) -> None: ...

    levels = [delay.level_name(level) for level in range(delay.LEVELS)]
    async with run_worker(Nightly):
        for level in levels:  # the shared levels: no earlier test's leftovers in the count
            rabbit.drain(level)
        await Nightly.anotify(delay=3600)
    state = state_queue(Nightly)
    rabbit.declare_queue(state, **queue_arguments(settings)[1])  # as the scheduler does
    tick = {"last_tick": "2026-12-07T03:00:00+00:00", "host": "host-s", "pid": 7, "runner_pid": 6}
    rabbit.publish("", state, json.dumps(tick).encode())
    client = TestClient(console_app(settings, Nightly, ttl=0)[0])

    [row] = cells(client.get("/schedules").text, "schedules")
    assert row.startswith(f"{Nightly.name()} 0 3 * * *")
    assert "2026-12-07 03:00:00 UTC host-s pid 7 (runner 6)" in row
    await eventually(lambda: client.get("/api/overview").json()["delay_levels"]["delayed"] == 1)
    assert '<span data-field="delayed">1</span>' in client.get("/").text
    for level in levels:
        rabbit.drain(level)


# -- the command ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_command_reads_the_ledger_named_by_database_url_and_never_prints_its_password(
    amqp_url: str, postgres_url: str, ledger: LedgerSource
) -> None:
    with ledger.engine.begin() as connection:
        report_worker(connection, "host-a", 1, WorkerBeat(("app:Orders",), NOW, [], 0, 0, 0))
    with_password = make_url(postgres_url).set(password="s3cret-pw")  # trust auth ignores it
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "AMQP_LISTENER_DATABASE_URL"}
    process = subprocess.Popen(
        [CLI, "web", "--port", str(port), "--database-url",
         with_password.render_as_string(hide_password=False)],
        env={**env, "AMQP_URL": amqp_url}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        workers_page = wait_until(
            lambda: _get(f"http://127.0.0.1:{port}/workers"), 20, "the console to answer"
        )
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    assert "0 of 1 workers busy" in workers_page
    assert "host-a" in workers_page
    assert "***" in stderr.splitlines()[0] and "s3cret-pw" not in stderr


def _get(url: str) -> str | None:
    try:
        return httpx.get(url).text
    except httpx.TransportError:
        return None
