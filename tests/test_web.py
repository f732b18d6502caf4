"""The web console over HTTP, against the real broker: refusals first (authentication,
CSRF, read-only, binding), then the security headers, the pages, replay and purge."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient
from support.web import NO_LEDGER, FakeManagement, console_app, csrf_token, declared_listener, park

from listener import Listener, topology
from listener._operator_connection import OperatorConnection
from listener._web_data import ABSENT_TTL, BrokerSource
from listener._web_security import Credentials
from listener.web import Console, create_app

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("amqp-listener"))
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@pytest.fixture
def mailer(unique, rabbit):
    return declared_listener(unique, rabbit)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def confirmed_form(client: TestClient, queue: str, action: str, ids: list[str]) -> dict:
    """Go through the confirmation page as a browser would; returns the form it posts."""
    query = [("action", action)] + [("id", i) for i in ids]
    page = client.get(f"/parked/{queue}/confirm", params=query)
    assert page.status_code == 200, page.text
    return {"csrf_token": csrf_token(page.text), "action": action, "confirmed": "yes", "id": ids}


# -- refusals ------------------------------------------------------------------------------


def test_without_credentials_every_page_is_a_401_and_no_data(settings, mailer, rabbit):
    park(rabbit, mailer)
    app, broker = console_app(settings, mailer, credentials=Credentials("ops", "s3cret-pw"))
    client = TestClient(app)

    for path in ("/", "/api/overview", f"/parked/{mailer.queue}", "/static/console.css"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert mailer.queue not in response.text
        assert response.headers["www-authenticate"].startswith("Basic")
    assert client.get("/", headers=basic("ops", "wrong")).status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer s3cret-pw"}).status_code == 401
    assert broker.queries == 0  # a refused request never reaches the broker


def test_with_basic_credentials_or_the_token_pages_answer_without_showing_them(settings, mailer):
    credentials = Credentials("ops", "s3cret-pw", token="tok-123456")
    client = TestClient(console_app(settings, mailer, credentials=credentials)[0])

    by_password = client.get("/", headers=basic("ops", "s3cret-pw"))
    by_token = client.get("/", headers={"Authorization": "Bearer tok-123456"})

    assert by_password.status_code == by_token.status_code == 200
    assert mailer.queue in by_password.text
    assert "s3cret-pw" not in by_password.text and "tok-123456" not in by_token.text
    assert "guest:guest" not in by_password.text  # nor the broker URL's password


def test_a_broker_that_does_not_answer_is_a_502_without_its_password(settings, mailer):
    away = settings.with_url("amqp://ops:t0p-s3cret@127.0.0.1:1/%2F")
    client = TestClient(console_app(away, mailer)[0])

    for path in ("/", "/api/overview", f"/parked/{mailer.queue}"):
        page = client.get(path)
        assert page.status_code == 502, path
        assert "127.0.0.1:1" in page.text and "t0p-s3cret" not in page.text, path


def test_an_action_without_or_with_a_forged_csrf_token_is_refused_and_changes_nothing(
    settings, mailer, rabbit
):
    [message_id] = park(rabbit, mailer)
    client = TestClient(console_app(settings, mailer)[0])
    form = confirmed_form(client, mailer.queue, "purge", [message_id])

    missing = client.post(f"/parked/{mailer.queue}/act", data={**form, "csrf_token": ""})
    forged = client.post(f"/parked/{mailer.queue}/act", data={**form, "csrf_token": "0" * 64})
    stranger = TestClient(client.app)  # another browser: no cookie, a token not its own
    replayed = stranger.post(f"/parked/{mailer.queue}/act", data=form)

    assert missing.status_code == forged.status_code == replayed.status_code == 403
    assert "CSRF" in forged.text
    assert rabbit.count(f"{mailer.queue}.dead") == 1


def test_read_only_hides_actions_and_refuses_them(settings, mailer, rabbit):
    [message_id] = park(rabbit, mailer)
    writable = TestClient(console_app(settings, mailer)[0])
    form = confirmed_form(writable, mailer.queue, "purge", [message_id])
    client = TestClient(console_app(settings, mailer, read_only=True)[0])
    client.cookies = writable.cookies

    listing = client.get(f"/parked/{mailer.queue}")
    confirm = client.get(f"/parked/{mailer.queue}/confirm", params={"action": "purge", "all": 1})
    posted = client.post(f"/parked/{mailer.queue}/act", data=form)

    assert listing.status_code == 200 and message_id in listing.text
    assert "Purge" not in listing.text and "Replay" not in listing.text
    assert confirm.status_code == posted.status_code == 403
    assert "read-only" in posted.text
    assert rabbit.count(f"{mailer.queue}.dead") == 1


def test_actions_are_post_only(settings, mailer, rabbit):
    [message_id] = park(rabbit, mailer)
    client = TestClient(console_app(settings, mailer)[0])

    response = client.get(
        f"/parked/{mailer.queue}/act",
        params={"action": "purge", "id": message_id, "confirmed": "yes"},
    )

    assert response.status_code == 405
    assert rabbit.count(f"{mailer.queue}.dead") == 1


def test_the_console_refuses_to_start_on_a_public_address_without_authentication(amqp_url):
    env = {k: v for k, v in os.environ.items() if k != "AMQP_LISTENER_WEB_TOKEN"}
    result = subprocess.run(
        [CLI, "web", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=30, env={**env, "AMQP_URL": amqp_url},
        check=False,
    )  # fmt: skip

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "amqp-listener: error: refusing to serve the console on 0.0.0.0 without "
        "authentication: pass --auth user:password or set AMQP_LISTENER_WEB_TOKEN, or bind "
        "127.0.0.1"
    ]


def test_without_the_web_extra_the_command_says_which_extra_to_install(amqp_url, tmp_path):
    (tmp_path / "uvicorn.py").write_text("raise ImportError('absent', name='uvicorn')\n")
    env = {**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [CLI, "web"], capture_output=True, text=True, timeout=30, env=env, check=False
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "amqp-listener: error: the web console needs its extra (uvicorn is missing): "
        "pip install 'amqp-listener[web]'"
    ]


# -- what every response carries -----------------------------------------------------------


def test_every_response_carries_the_security_headers(settings, mailer):
    client = TestClient(console_app(settings, mailer)[0])
    locked = TestClient(console_app(settings, mailer, credentials=Credentials(token="t0k"))[0])

    responses = [
        client.get("/"),
        client.get("/api/overview"),
        client.get("/static/console.js"),
        client.get("/no-such-page"),
        client.post(f"/parked/{mailer.queue}/act", data={}),
        locked.get("/"),
    ]

    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value, (response.url, name)
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy


def test_an_unexpected_failure_is_a_500_with_the_security_headers_and_no_detail(
    settings, mailer, monkeypatch
):
    app, broker = console_app(settings, mailer)

    def broken() -> None:
        raise RuntimeError("internal detail amqp://guest:guest@broker")

    monkeypatch.setattr(broker, "overview", broken)
    response = TestClient(app, raise_server_exceptions=False).get("/")

    assert response.status_code == 500
    assert "internal detail" not in response.text and "guest" not in response.text
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value, name
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


# -- pages ---------------------------------------------------------------------------------


def test_the_overview_counts_come_from_one_broker_query_per_five_seconds(settings, mailer, rabbit):
    park(rabbit, mailer, 2)
    app, broker = console_app(settings, mailer)
    tabs = [TestClient(app) for _ in range(3)]

    documents = [tab.get("/api/overview").json() for tab in tabs for _ in range(3)]

    assert broker.queries == 1
    (row,) = documents[-1]["listeners"]
    assert (row["queue"], row["parked"], row["ready"]) == (mailer.queue, 2, 0)


@pytest.fixture
def management():
    fake = FakeManagement()
    yield fake
    fake.close()


def test_a_refresh_asks_the_management_api_once_whatever_the_number_of_listeners(
    settings, unique, rabbit, management
):
    mailers = [declared_listener(f"{unique}x{n}", rabbit) for n in range(3)]
    counts = {"messages_ready": 0, "messages_unacknowledged": 7, "consumers": 2}
    management.queues = {cls.queue: counts for cls in mailers}
    watched = settings.model_copy(update={"management_url": management.url})
    broker = BrokerSource(watched, mailers, ttl=60)
    client = TestClient(create_app(Console(broker, NO_LEDGER)))

    documents = []
    for _ in range(2):
        documents.append(client.get("/api/overview").json())
        broker.forget()  # as when the cache expires

    assert broker.queries == 2
    assert len(management.asked) == 2, management.asked  # one a refresh, not one a listener
    assert [row["unacked"] for row in documents[-1]["listeners"]] == [7, 7, 7]
    assert [row["consumers"] for row in documents[-1]["listeners"]] == [2, 2, 2]


def test_a_delay_queue_found_missing_is_not_asked_about_again_for_minutes(
    settings, mailer, rabbit, monkeypatch
):
    old = topology.delay_queue_name(mailer.queue, 60)  # an earlier version's, still there
    never = topology.delay_queue_name(mailer.queue, 120)  # an earlier version's, gone
    rabbit.declare_queue(old)
    rabbit.publish("", old, b"{}")
    asked: list[str] = []
    declare_ok = OperatorConnection.declare_ok

    def counting(self, queue):
        asked.append(queue)
        return declare_ok(self, queue)

    monkeypatch.setattr(OperatorConnection, "declare_ok", counting)
    broker = BrokerSource(settings, [mailer], ttl=60)

    class Later:  # the console's clock, `ahead` seconds ahead
        def __init__(self, ahead: float) -> None:
            self.ahead = ahead

        def monotonic(self) -> float:
            return time.monotonic() + self.ahead

    refreshes = []
    for ahead in (0.0, 0.0, 1.5 * ABSENT_TTL + 1):
        monkeypatch.setattr("listener._web_data.time", Later(ahead))
        asked.clear()
        broker.forget()
        (row,), _ = broker.overview()
        refreshes.append((set(asked), row.waiting_retry))

    (first, waiting_1), (second, waiting_2), (third, _) = refreshes
    assert never in first and never not in second and never in third
    assert {old, mailer.queue, f"{mailer.queue}.dead"} <= first & second
    assert waiting_1 == waiting_2 == 1
    declared = {spec.name for spec in mailer.topology().queues}
    own = {name for name in second if name.startswith(mailer.queue)}
    assert own == declared | {old}  # only what exists is asked about again


def test_a_parked_message_shows_its_failure_but_its_body_only_when_asked(settings, mailer, rabbit):
    [message_id] = park(rabbit, mailer, body=b'{"to": "secret@example.com"}')
    hidden = TestClient(console_app(settings, mailer)[0])
    shown = TestClient(console_app(settings, mailer, show_bodies=True)[0])

    page = hidden.get(f"/parked/{mailer.queue}/message", params={"id": message_id})
    with_body = shown.get(f"/parked/{mailer.queue}/message", params={"id": message_id})

    assert page.status_code == 200
    assert "SMTPError" in page.text and "the mail server said no (0)" in page.text
    assert "secret@example.com" not in page.text and "--show-bodies" in page.text
    assert "secret@example.com" in with_body.text
    missing = hidden.get(f"/parked/{mailer.queue}/message", params={"id": "nope"})
    assert missing.status_code == 404


def test_the_parked_list_pages_oldest_first(settings, mailer, rabbit):
    ids = park(rabbit, mailer, 55)
    client = TestClient(console_app(settings, mailer)[0])

    first = client.get(f"/parked/{mailer.queue}")
    second = client.get(f"/parked/{mailer.queue}", params={"after": ids[49]})

    assert first.text.index(ids[0]) < first.text.index(ids[49])
    assert ids[50] not in first.text and 'rel="next"' in first.text
    assert all(i in second.text for i in ids[50:]) and f"id={ids[49]}" not in second.text


def test_only_a_listeners_queue_can_be_browsed(settings, mailer, rabbit):
    client = TestClient(console_app(settings, mailer)[0])

    assert client.get("/parked/some.other.queue").status_code == 404


def test_replaying_a_selection_moves_those_and_purging_all_deletes_the_rest(
    settings, mailer, rabbit
):
    ids = park(rabbit, mailer, 3)
    client = TestClient(console_app(settings, mailer)[0])

    form = confirmed_form(client, mailer.queue, "replay", ids[:2])
    replayed = client.post(f"/parked/{mailer.queue}/act", data=form)

    assert replayed.status_code == 200 and "Replayed 2 message(s)" in replayed.text
    assert sorted(p.message_id for p, _ in rabbit.drain(mailer.queue)) == sorted(ids[:2])

    page = client.get(f"/parked/{mailer.queue}/confirm", params={"action": "purge", "all": 1})
    form = {"csrf_token": csrf_token(page.text), "action": "purge", "confirmed": "yes", "all": 1}
    purged = client.post(f"/parked/{mailer.queue}/act", data=form)

    assert purged.status_code == 200 and "Purged 1 message(s)" in purged.text
    assert rabbit.count(f"{mailer.queue}.dead") == 0


def test_topology_draws_exchange_queue_delay_and_dead_queues(settings, mailer):
    page = TestClient(console_app(settings, mailer)[0]).get("/topology")

    assert page.status_code == 200
    topology = mailer.topology()
    for name in (topology.exchange, mailer.queue, f"{mailer.queue}.dead"):
        assert name in page.text
    assert all(spec.name in page.text for spec in topology.delays)


def test_topology_is_drawn_as_a_graph_of_nodes_and_edges(settings, unique):
    class Invoices(Listener):
        subscribes_to = f"{unique}.invoice.created"
        queue = f"{unique}.invoices"
        retry_delays = (1, 30)

        def handle(self, message: dict) -> None: ...

    class Refunds(Listener):
        subscribes_to = f"{unique}.refund.#"
        queue = f"{unique}.refunds"
        retry_delays = (5,)

        def handle(self, message: dict) -> None: ...

    broker = BrokerSource(settings, [Invoices, Refunds])
    page = TestClient(create_app(Console(broker, NO_LEDGER))).get("/topology")

    assert page.status_code == 200
    svg = page.text.split('<svg id="topology-graph"', 1)[1].split("</svg>", 1)[0]
    nodes = re.findall(r'data-node="(\w+)">\s*<title>([^<]+)</title>', svg)
    edges = re.findall(r'data-edge="(\w+)" data-from="([^"]+)" data-to="([^"]+)"', svg)
    exchange = Invoices.topology().exchange
    assert sorted(nodes) == sorted(
        [("exchange", exchange)]
        + [("queue", cls.queue) for cls in (Invoices, Refunds)]
        + [("delay", spec.name) for cls in (Invoices, Refunds) for spec in cls.topology().delays]
        + [("dead", f"{cls.queue}.dead") for cls in (Invoices, Refunds)]
    )
    assert ("binding", exchange, Invoices.queue) in edges
    assert ("binding", exchange, Refunds.queue) in edges
    assert ("retry", Invoices.queue, Invoices.topology().delays[1].name) in edges
    assert ("parked", Refunds.queue, f"{Refunds.queue}.dead") in edges
    assert len(edges) == 2 + 3 + 2
    assert "refund.#" in svg  # the binding keys label their edges


def test_without_modules_or_management_api_the_pages_say_what_is_missing(settings, mailer):
    nowhere = settings.model_copy(update={"management_url": "http://127.0.0.1:9"})
    client = TestClient(create_app(Console(BrokerSource(nowhere, None), NO_LEDGER)))

    for path in ("/", "/parked", "/topology", "/schedules"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert "amqp-listener web myapp.listeners" in page.text, path
    assert "enable the management plugin" in client.get("/").text
    assert "enable the management plugin" in client.get("/parked").text
    assert client.get("/api/overview").json()["listeners"] == []


def test_with_modules_but_no_management_api_the_overview_says_what_unacked_needs(settings, mailer):
    nowhere = settings.model_copy(update={"management_url": "http://127.0.0.1:9"})
    client = TestClient(create_app(Console(BrokerSource(nowhere, [mailer]), NO_LEDGER)))

    page = client.get("/")

    assert page.status_code == 200 and mailer.queue in page.text
    assert "Unacked counts need the RabbitMQ management plugin" in page.text


def test_without_modules_the_management_api_finds_the_listener_queues(settings, mailer, management):
    counts = {"messages_ready": 0, "messages_unacknowledged": 0, "consumers": 0}
    management.queues = {name: counts for name in (mailer.queue, f"{mailer.queue}.dead")}
    watched = settings.model_copy(update={"management_url": management.url})
    client = TestClient(create_app(Console(BrokerSource(watched, None), NO_LEDGER)))

    (row,) = client.get("/api/overview").json()["listeners"]

    assert row["queue"] == mailer.queue and row["parked"] == 0


def test_workers_and_jobs_say_they_need_the_ledger(settings, mailer):
    client = TestClient(console_app(settings, mailer)[0])

    for path in ("/workers", "/jobs"):
        page = client.get(path)
        assert page.status_code == 200
        assert "needs the job ledger" in page.text
        assert "AMQP_LISTENER_DATABASE_URL" in page.text


@pytest.mark.slow
def test_with_the_token_set_the_console_serves_a_public_address_to_its_bearer_only(
    amqp_url, mailer, tmp_path
):
    module = tmp_path / "console_app.py"
    module.write_text(
        "from listener import Listener\n"
        "class Mailer(Listener):\n"
        f"    subscribes_to = '{mailer.topology().exchange}.send'\n"
        f"    queue = '{mailer.queue}'\n"
        "    def handle(self, message): ...\n"
    )
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "AMQP_URL": amqp_url, "AMQP_LISTENER_WEB_TOKEN": "tok-abcdef"}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"
    process = subprocess.Popen(
        [CLI, "web", "console_app", "--host", "0.0.0.0", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                refused = httpx.get(f"http://127.0.0.1:{port}/api/overview")
                break
            except httpx.TransportError:
                assert process.poll() is None, "the console exited"
                assert time.monotonic() < deadline, "the console never answered"
                time.sleep(0.1)
        allowed = httpx.get(
            f"http://127.0.0.1:{port}/api/overview",
            headers={"Authorization": "Bearer tok-abcdef"},
        )
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()

    assert refused.status_code == 401 and mailer.queue not in refused.text
    assert allowed.status_code == 200
    assert [row["queue"] for row in allowed.json()["listeners"]] == [mailer.queue]
