"""End-to-end demo of the outbox and the inbox: the orders app of examples/orders/app.py
under uvicorn, and `amqp-listener run examples.orders.listeners --outbox` beside it.

    python -m examples.orders.demo          (or: make examples)

SQLite in a temporary directory by default; set AMQP_LISTENER_DATABASE_URL to a PostgreSQL
URL to run it there. Needs RabbitMQ at AMQP_URL. Shows an order placed and its message
committed together (201), shipped by the listener that reads it, the customer told through
the outbox in the listener's own transaction, and a bad request (422) that wrote nothing.
Exit code 0 when everything happened as expected, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from examples.demo_kit import (
    ROOT,
    Broker,
    DemoFailed,
    line_buffered_stdout,
    start_runner,
    stop_runner,
    wait,
)
from examples.orders.listeners import ShipOrder, TellCustomer
from examples.web_publisher.demo import expect, post, serve_app
from listener.database import redact_database_url
from listener.settings import get_settings

CLI = str(Path(sys.executable).with_name("amqp-listener"))


def main() -> int:
    line_buffered_stdout()
    Broker(get_settings().url.get_secret_value()).close()  # fail early, and clearly
    work = Path(tempfile.mkdtemp(prefix="orders-demo-"))
    url = os.environ.get("AMQP_LISTENER_DATABASE_URL") or f"sqlite:///{work / 'orders.db'}"
    env = {"AMQP_LISTENER_DATABASE_URL": url}
    print(f"1. database {redact_database_url(url)}: amqp-listener db upgrade")
    upgrade = subprocess.run(
        [CLI, "db", "upgrade"], env={**os.environ, **env}, capture_output=True, text=True
    )
    if upgrade.returncode != 0:
        raise DemoFailed(f"db upgrade failed: {upgrade.stderr.strip()}")

    print("2. starting: amqp-listener run examples.orders.listeners --outbox")
    runner = start_runner(["examples.orders.listeners", "--outbox"], env=env)
    code = 1
    try:
        broker = Broker(get_settings().url.get_secret_value())
        broker.wait_consuming(runner, [ShipOrder, TellCustomer])
        broker.close()
        with serve_app(env=env, app="examples.orders.app:app") as base:
            print(f"3. serving uvicorn examples.orders.app:app at {base}")
            status, body = post(f"{base}/orders", {"customer": "ada", "item": "tea", "quantity": 2})
            expect("a valid order", status, 201, body)
            order_id = body["order_id"]
            print(f"4. POST /orders -> 201 {body}: the order and its message committed together")
            shown = wait(lambda: shipped(base, order_id), "the order to be shipped and told")
            print(f"5. GET /orders/{order_id} -> {shown}: shipped, then the customer told")
            status, body = post(f"{base}/orders", {"customer": "bob", "item": "tea", "quantity": 0})
            expect("an order of nothing", status, 422, body)
            print("6. POST /orders with quantity 0 -> 422: no order, no message")
        lag = subprocess.run(
            [CLI, "status", "examples.orders.listeners", "--json"],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if lag.returncode == 0:
            print(f"7. amqp-listener status --json: outbox {json.loads(lag.stdout)['outbox']}")
    finally:
        print("8. SIGTERM to the runner: workers drain, the relay finishes its batch")
        code = stop_runner(runner)
        print(f"   runner exit code: {code}")
        shutil.rmtree(work, ignore_errors=True)
    if code != 0:
        raise DemoFailed(f"the runner exited with code {code}")
    print("outcome: as expected (201, shipped once, customer told, 422)")
    return 0


def shipped(base: str, order_id: int) -> dict[str, Any] | None:
    with urllib.request.urlopen(f"{base}/orders/{order_id}", timeout=10) as response:
        shown: dict[str, Any] = json.loads(response.read())
    return shown if shown["status"] == "shipped" and shown["customer_told"] else None


if __name__ == "__main__":
    sys.exit(main())
