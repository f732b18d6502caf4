"""The web console in a real browser (Playwright driving Debian's Chromium) against the
real broker: the overview refreshing by itself, a parked message replayed, and actions
refused. Screenshots of every page go to artifacts/web/."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from support.databases import empty_ledger
from support.waiting import wait_until
from support.web import console_app, declared_listener, park

from listener import Listener, jobs
from listener._web_data import LedgerSource
from listener.ledger import report_worker
from listener.recorder import WorkerBeat
from listener.recording import LedgerMiddleware
from listener.runner.worker import Worker

pytestmark = pytest.mark.slow

playwright_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "web"
CHROMIUM = "/usr/bin/chromium"
NOW = dt.datetime.now(dt.UTC)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Serve `app` on a free loopback port in a thread; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the console did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def working(cls: type[Listener], settings) -> Iterator[Worker]:
    """A worker for `cls`, recording into the ledger, on its own event loop in a thread."""
    worker = Worker([cls], settings, install_signals=False, middleware=[LedgerMiddleware(settings)])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
    thread.start()
    try:
        wait_until(lambda: worker.ready or not thread.is_alive(), 15, "the worker to be ready")
        assert worker.ready, "the worker did not start"
        yield worker
    finally:
        loop.call_soon_threadsafe(worker.request_stop, "test finished")
        thread.join(timeout=30)
        loop.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 650})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def shoot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def unlabelled_controls(page) -> list[str]:
    return page.evaluate(
        """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
              .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
              .map(el => el.outerHTML)"""
    )


def test_the_overview_counts_change_without_reloading(page, settings, unique, rabbit):
    mailer = declared_listener(unique, rabbit)
    app, _ = console_app(settings, mailer, ttl=1)
    with serving(app) as base:
        page.goto(base + "/")
        ready = page.locator(f'tr[data-queue="{mailer.queue}"] [data-field="ready"]')
        assert ready.inner_text() == "0"
        page.evaluate("window.notReloaded = true")

        mailer.notify(to="a@b.c")

        playwright_api.expect(ready).to_have_text("1")
        assert page.evaluate("window.notReloaded") is True
        shoot(page, "overview")
        for path, name in (("/topology", "topology"), ("/workers", "workers"), ("/jobs", "jobs")):
            page.goto(base + path)
            shoot(page, name)
        assert "needs the job ledger" in page.inner_text("main")


def test_a_parked_message_is_opened_and_replayed_from_the_keyboard(page, settings, unique, rabbit):
    mailer = declared_listener(unique, rabbit)
    ids = park(rabbit, mailer, 3)
    app, _ = console_app(settings, mailer)
    with serving(app) as base:
        page.goto(base + f"/parked/{mailer.queue}")
        assert unlabelled_controls(page) == []
        shoot(page, "parked")

        page.get_by_role("link", name=ids[1]).focus()
        page.keyboard.press("Enter")
        playwright_api.expect(page.get_by_role("heading", level=1)).to_contain_text(ids[1])
        assert "SMTPError" in page.inner_text("main")
        shoot(page, "message")

        page.get_by_role("button", name="Replay this message…").focus()
        page.keyboard.press("Enter")
        playwright_api.expect(page.get_by_role("heading", level=1)).to_contain_text("Replay 1")
        shoot(page, "confirm")
        page.get_by_role("button", name="Yes, replay").focus()
        page.keyboard.press("Enter")
        playwright_api.expect(page.get_by_role("status")).to_have_text("Replayed 1 message(s)")
        shoot(page, "replayed")

        page.get_by_role("link", name="Back to the parked messages").click()
        listed = page.inner_text("#parked")
        assert ids[1] not in listed and ids[0] in listed and ids[2] in listed
    assert [p.message_id for p, _ in rabbit.drain(mailer.queue)] == [ids[1]]


def test_every_parked_message_is_purged_after_a_confirmation(page, settings, unique, rabbit):
    mailer = declared_listener(unique, rabbit)
    ids = park(rabbit, mailer, 2)
    app, _ = console_app(settings, mailer)
    with serving(app) as base:
        page.goto(base + "/parked")
        shoot(page, "parked-index")
        page.get_by_role("link", name=f"{mailer.queue}.dead").click()
        assert all(message_id in page.inner_text("#parked") for message_id in ids)
        page.get_by_role("button", name="Purge all 2…").click()
        heading = page.get_by_role("heading", level=1)
        playwright_api.expect(heading).to_contain_text("Purge every parked message")
        assert rabbit.count(f"{mailer.queue}.dead") == 2  # nothing happens before the yes
        shoot(page, "confirm-purge")
        page.get_by_role("button", name="Yes, purge").click()
        playwright_api.expect(page.get_by_role("status")).to_have_text("Purged 2 message(s)")
        shoot(page, "purged")
        page.goto(base + "/schedules")
        shoot(page, "schedules")
    assert rabbit.count(f"{mailer.queue}.dead") == 0


def test_actions_are_refused_read_only_and_without_a_csrf_token(page, settings, unique, rabbit):
    mailer = declared_listener(unique, rabbit)
    [message_id] = park(rabbit, mailer)
    post = """async ([url, body]) => {
        const response = await fetch(url, {method: "POST", body: body,
            headers: {"Content-Type": "application/x-www-form-urlencoded"}});
        return response.status;
    }"""
    action = f"/parked/{mailer.queue}/act"
    form = f"action=purge&confirmed=yes&id={message_id}"

    read_only, _ = console_app(settings, mailer, read_only=True)
    with serving(read_only) as base:
        page.goto(base + f"/parked/{mailer.queue}")
        assert page.get_by_role("button").count() == 0
        assert page.get_by_text("read-only").is_visible()
        shoot(page, "read-only")
        assert page.evaluate(post, [base + action, form]) == 403
        page.goto(base + f"/parked/{mailer.queue}/confirm?action=purge&all=1")
        assert "read-only" in page.inner_text("#error")
        shoot(page, "refused")

    writable, _ = console_app(settings, mailer)
    with serving(writable) as base:
        page.goto(base + f"/parked/{mailer.queue}")
        assert page.evaluate(post, [base + action, form]) == 403
        assert page.evaluate(post, [base + action, form + "&csrf_token=" + "0" * 64]) == 403

    assert rabbit.count(f"{mailer.queue}.dead") == 1


def test_a_parked_message_replayed_from_the_console_ends_handled_in_its_job_story(
    page, settings, unique, rabbit, postgres_url
):
    empty_ledger(postgres_url)
    broken = {"yes": True}

    class Invoices(Listener):
        subscribes_to = f"{unique}.invoice"
        queue = f"{unique}.invoices"
        max_attempts = 1

        def handle(self, message: dict[str, Any]) -> None:
            if broken["yes"]:
                raise ConnectionError("the PDF service is down")

    rabbit.track(Invoices)
    ledger = LedgerSource(postgres_url, ttl=0)
    recorded = settings.with_database_url(postgres_url)

    def state(message_id: str) -> str | None:
        found = jobs.show(message_id, engine=ledger.engine)
        return found[0].state if found else None

    app, _ = console_app(settings, Invoices, jobs=ledger)
    try:
        with working(Invoices, recorded), serving(app) as base:
            message_id = Invoices.notify(number=7)
            wait_until(lambda: state(message_id) == "parked", 15, "the message to be parked")
            page.goto(base + f"/parked/{Invoices.queue}/message?id={message_id}")
            assert "ConnectionError" in page.inner_text("main")
            broken["yes"] = False
            page.get_by_role("button", name="Replay this message…").click()
            page.get_by_role("button", name="Yes, replay").click()
            playwright_api.expect(page.get_by_role("status")).to_have_text("Replayed 1 message(s)")
            wait_until(lambda: state(message_id) == "handled", 15, "the replay to be handled")

            page.goto(base + f"/parked/{Invoices.queue}")
            assert message_id not in page.inner_text("main")
            page.goto(base + f"/jobs?message_id={message_id}")
            assert unlabelled_controls(page) == []  # the search form
            shoot(page, "jobs-ledger")
            page.get_by_role("link", name=message_id).click()
            story = page.locator(".timeline li")
            playwright_api.expect(story.last).to_contain_text("attempt 1: handled")
            assert "attempt 1: parked" in story.nth(story.count() - 2).inner_text()
            assert "ConnectionError: the PDF service is down" in page.inner_text("#story")
            assert page.locator("[data-state]").inner_text() == "handled"
            assert unlabelled_controls(page) == []
            shoot(page, "job")
            page.goto(base + "/workers")
            busy = page.locator("#busy")
            playwright_api.expect(busy).to_have_text("0 of 1 workers busy")
            page.evaluate("window.notReloaded = true")
            running = [
                {"message_id": "m-7", "listener": "app:Other", "since": "2026-12-07T05:00:00"}
            ]
            with ledger.engine.begin() as connection:
                report_worker(
                    connection, "host-x", 1, WorkerBeat(("app:Other",), NOW, running, 0, 0, 0)
                )
            playwright_api.expect(busy).to_have_text("1 of 2 workers busy")
            assert page.evaluate("window.notReloaded") is True
            shoot(page, "workers-ledger")
            page.goto(base + "/")
            assert page.locator("#activity svg").count() == 1
            shoot(page, "overview-ledger")
    finally:
        ledger.close()
