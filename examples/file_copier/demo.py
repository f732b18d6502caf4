"""End-to-end demo: start a runner, notify a few copies, show them handled and one parked.

    python -m examples.file_copier.demo        (or: make demo)

Needs RabbitMQ at AMQP_URL (default amqp://guest:guest@localhost:5672/%2F).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pika

from examples.file_copier.listeners import FileCopier
from listener.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    url = get_settings().url.get_secret_value()
    work = Path(tempfile.mkdtemp(prefix="file-copier-demo-"))
    for name in ("a", "b", "c"):
        (work / f"{name}.txt").write_text(f"contents of {name}\n")

    print("1. starting the runner: amqp-listener run examples.file_copier.listeners")
    runner = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("amqp-listener")),
            "run",
            "examples.file_copier.listeners",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        broker = pika.BlockingConnection(pika.URLParameters(url))
        channel = broker.channel()

        def consuming() -> bool:
            if runner.poll() is not None:
                raise SystemExit("demo failed: the runner exited; see its log above")
            return _consumers(broker, FileCopier.queue) > 0

        _wait(consuming, "the runner to start consuming")

        print("2. notifying: three copies that work, one whose source never appears")
        for case_id, name in enumerate(("a", "b", "c"), start=1):
            FileCopier.notify(
                case_id=case_id, src=str(work / f"{name}.txt"), dst=str(work / f"{name}.copy")
            )
        missing_id = FileCopier.notify(
            case_id=4, src=str(work / "missing.txt"), dst=str(work / "d.copy")
        )

        _wait(lambda: all((work / f"{n}.copy").exists() for n in "abc"), "the three copies")
        print(f"3. handled: {', '.join(sorted(p.name for p in work.glob('*.copy')))}")

        print("   the missing source is retried after 1 s and 2 s, then parked ...")
        headers = _wait(
            lambda: _find_parked(channel, missing_id), "the failing message to be parked", 30
        )
        print(f"4. parked in {FileCopier.queue}.dead: message {missing_id}")
        for key in (
            "x-parked-reason",
            "x-attempts",
            "x-exception-type",
            "x-exception-message",
            "x-listener",
            "x-first-failure-at",
            "x-last-failure-at",
        ):
            print(f"     {key}: {headers[key]}")
        print(f"   {len(_PEEKED)} message(s) wait in {FileCopier.queue}.dead (earlier runs' too)")
        broker.close()
    finally:
        print("5. SIGTERM to the runner: it drains and exits")
        runner.send_signal(signal.SIGTERM)
        code = runner.wait(timeout=60)
        print(f"   runner exit code: {code}")
    return 0 if code == 0 else 1


def _consumers(broker: pika.BlockingConnection, queue: str) -> int:
    channel = broker.channel()  # a passive declare of a missing queue closes its channel
    try:
        return int(channel.queue_declare(queue, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0  # not declared yet: the runner declares it when it starts
    finally:
        if channel.is_open:
            channel.close()


def _find_parked(
    channel: pika.adapters.blocking_connection.BlockingChannel, message_id: str
) -> dict | None:
    """Look through the dead-letter queue without removing anything (peek and hand back)."""
    found = None
    tags = []
    _PEEKED.clear()
    while True:
        method, properties, _body = channel.basic_get(f"{FileCopier.queue}.dead")
        if method is None:
            break
        tags.append(method.delivery_tag)
        _PEEKED.append(properties.message_id)
        if properties.message_id == message_id:
            found = properties.headers
    if tags:
        channel.basic_nack(tags[-1], multiple=True, requeue=True)
    return found


_PEEKED: list[str] = []


def _wait(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise SystemExit(f"demo failed: timed out waiting for {what}")


if __name__ == "__main__":
    sys.exit(main())
