"""`python -m bench.web_console`: the web console's numbers (issue 14).

* **Overview:** the server time of `GET /` with `--listeners` declared listeners (50): the
  console's first (which also asks about every delay queue of earlier versions), then
  renders asking the broker afresh (a cache miss, as every 5 s), and from the cache; then
  the same beside a stand-in management API that lists the declared queues.
* **Parked page:** the first page of one listener holding `--parked` parked messages of
  1 KiB (100,000): the server time of `GET /parked/QUEUE`, and the process's peak RSS
  before and after.
* **Idle cost:** one tab polling the overview as the page's script does (every `REFRESH`
  seconds) for `--idle` seconds, against a stand-in for the management API (the shared
  broker has no management plugin): requests it answered, per listener and per 5 s.

Goals: the overview under 200 ms, the parked page's first page under 500 ms with bounded
memory, at most one management query per listener every 5 s. The queues are deleted
afterwards.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika
from starlette.testclient import TestClient

from bench.dead_letters import _fill
from bench.wire import url as default_url
from listener import Listener
from listener._web_data import BrokerSource, NoLedger
from listener.settings import Settings
from listener.web import REFRESH, Console, create_app

NO_LEDGER = NoLedger("no ledger in this measurement")


def _listener(token: str, n: int) -> type[Listener]:
    class Bench(Listener):
        subscribes_to = f"bench-web-{token}.event{n}"
        queue = f"bench-web-{token}.q{n}"

        def handle(self, message: dict) -> None: ...

    Bench.__name__ = Bench.__qualname__ = f"Bench{n}"
    return Bench


def _declare(channel, cls: type[Listener]) -> list[str]:
    topology = cls.topology()
    for spec in topology.queues:
        channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
    return [spec.name for spec in topology.queues]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed_get(client: TestClient, path: str) -> float:
    started = time.perf_counter()
    response = client.get(path)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"GET {path} answered {response.status_code}: {response.text[:300]}")
    return seconds


class _Management(BaseHTTPRequestHandler):
    """Answers as the management API would, and counts what it was asked."""

    requests: list[str] = []
    names: list[str] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        if self.path.startswith("/api/overview"):
            document: object = {"rabbitmq_version": "stand-in"}
        elif self.path.startswith("/api/queues/"):
            record = {"messages_ready": 0, "messages_unacknowledged": 0, "consumers": 0}
            document = [{**record, "name": name} for name in type(self).names]
        else:
            self.send_error(404)
            return
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


@contextmanager
def _management(names: list[str]) -> Iterator[tuple[str, list[str]]]:
    _Management.requests, _Management.names = [], names
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Management)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Management.requests
    finally:
        server.shutdown()
        server.server_close()


def overview(settings: Settings, listeners: list[type[Listener]], rounds: int) -> dict:
    cold_source = BrokerSource(settings, listeners, ttl=0)
    cold = TestClient(create_app(Console(cold_source, NO_LEDGER)))
    warm = TestClient(create_app(Console(BrokerSource(settings, listeners), NO_LEDGER)))
    first = _timed_get(cold, "/")  # the first asks about every delay queue, missing ones too
    misses = [_timed_get(cold, "/") for _ in range(rounds)]
    _timed_get(warm, "/")
    hits = [_timed_get(warm, "/") for _ in range(rounds)]
    return {
        "listeners": len(listeners),
        "first_ms": round(first * 1000, 1),
        "miss_ms_median": round(statistics.median(misses) * 1000, 1),
        "miss_ms_max": round(max(misses) * 1000, 1),
        "hit_ms_median": round(statistics.median(hits) * 1000, 1),
    }


def parked(settings: Settings, cls: type[Listener], rounds: int) -> dict:
    client = TestClient(create_app(Console(BrokerSource(settings, [cls]), NO_LEDGER)))
    before = _rss_mib()
    times = [_timed_get(client, f"/parked/{cls.queue}") for _ in range(rounds)]
    return {
        "first_page_s_median": round(statistics.median(times), 2),
        "first_page_s_max": round(max(times), 2),
        "peak_rss_mib_before": round(before),
        "peak_rss_mib_after": round(_rss_mib()),
    }


def idle(
    settings: Settings, listeners: list[type[Listener]], names: list[str], seconds: float
) -> dict:
    with _management(names) as (base, requests):
        watched = settings.model_copy(update={"management_url": base})
        client = TestClient(create_app(Console(BrokerSource(watched, listeners), NO_LEDGER)))
        client.get("/")
        requests.clear()  # count from the first refresh on, as a tab left open
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            time.sleep(REFRESH)
            client.get("/api/overview")
        elapsed = time.monotonic() - started
        asked = list(requests)
    per = len(asked) / len(listeners) / (elapsed / 5)
    return {
        "listeners": len(listeners),
        "seconds": round(elapsed, 1),
        "management_requests": len(asked),
        "per_listener_per_5s": round(per, 2),
        "paths": sorted({path.split("?")[0].rsplit("/", 1)[0] for path in asked}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.web_console", description=__doc__)
    parser.add_argument("--listeners", type=int, default=50, help="listeners shown (50)")
    parser.add_argument("--parked", type=int, default=100_000, help="messages parked (100000)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle tab (30)")
    parser.add_argument("--rounds", type=int, default=5, help="timed requests of each (5)")
    parser.add_argument("--url", default=default_url())
    args = parser.parse_args()

    token = uuid.uuid4().hex[:8]
    settings = Settings(url=args.url)
    listeners = [_listener(token, n) for n in range(args.listeners)]
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    declared: list[str] = []
    results: dict[str, dict] = {}
    try:
        for cls in listeners:
            declared += _declare(channel, cls)
        results["overview"] = overview(settings, listeners, args.rounds)
        print(json.dumps({"overview": results["overview"]}), file=sys.stderr)
        with _management(declared) as (base, _requests):
            watched = settings.model_copy(update={"management_url": base})
            results["overview_with_management"] = overview(watched, listeners, args.rounds)
        if args.idle:
            results["idle_one_listener"] = idle(settings, listeners[:1], declared, args.idle)
            results["idle"] = idle(settings, listeners, declared, args.idle)
            print(json.dumps({"idle": results["idle"]}), file=sys.stderr)
        if args.parked:
            print(f"parking {args.parked} messages of 1 KiB ...", file=sys.stderr)
            _fill(channel, f"{listeners[0].queue}.dead", args.parked)
            results["parked"] = {"messages": args.parked}
            results["parked"] |= parked(settings, listeners[0], args.rounds)
    finally:
        for name in declared:
            channel.queue_delete(name)
        connection.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
