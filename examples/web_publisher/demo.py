"""End-to-end demo of a web service that queues work: the FastAPI app of
examples/web_publisher/app.py, served by uvicorn, in front of the FileCopier runner.

    python -m examples.web_publisher.demo        (or: make examples)

Needs RabbitMQ at AMQP_URL (default amqp://guest:guest@localhost:5672/%2F). Shows a request
queued (202, then copied by the runner), a bad request refused (422, nothing sent), and the
app pointed at a broker that does not answer (503, no password in the answer). Exit code 0
when everything happened as expected, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
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
from examples.file_copier.listeners import FileCopier
from listener.settings import get_settings, redact_url


def main() -> int:
    line_buffered_stdout()
    Broker(get_settings().url.get_secret_value()).close()  # fail early, and clearly
    work = Path(tempfile.mkdtemp(prefix="web-publisher-demo-"))
    (work / "report.pdf").write_text("case 7: the report\n")

    print("1. starting the runner: amqp-listener run examples.file_copier.listeners")
    runner = start_runner(["examples.file_copier.listeners"])
    try:
        broker = Broker(get_settings().url.get_secret_value())
        broker.wait_consuming(runner, [FileCopier])
        broker.close()

        with serve_app() as base:
            print(f"2. serving the app: uvicorn examples.web_publisher.app:app at {base}")
            order = {"src": str(work / "report.pdf"), "dst": str(work / "report.copy.pdf")}
            status, body = post(f"{base}/cases/7/copies", order)
            expect("a valid request", status, 202, body)
            print(f"3. POST /cases/7/copies -> 202 {body}: the broker confirmed it")
            original, copy = work / "report.pdf", work / "report.copy.pdf"
            # The copy exists from its first byte: wait until it is whole, then compare.
            wait(
                lambda: copy.exists() and copy.stat().st_size >= original.stat().st_size,
                "the runner to copy the file",
            )
            if copy.read_bytes() != original.read_bytes():
                raise DemoFailed("the copy differs from the original")
            print("4. handled by the runner: report.copy.pdf written")

            status, body = post(f"{base}/cases/7/copies", {**order, "dst": "relative.pdf"})
            expect("a relative destination", status, 422, body)
            print(f"5. POST with a relative dst -> 422, nothing sent: {body['detail'][0]['msg']}")

        unreachable = f"amqp://guest:demo-secret@127.0.0.1:{free_port()}/%2F"
        print(f"6. the same app with AMQP_URL={redact_url(unreachable)} (nothing listens)")
        with serve_app(env={"AMQP_URL": unreachable}) as base:
            status, body = post(f"{base}/cases/8/copies", order)
            expect("a request while the broker is unreachable", status, 503, body)
            if "demo-secret" in json.dumps(body):
                raise DemoFailed("the 503 answer holds the broker password")
            print(f"   POST /cases/8/copies -> 503 {body}")
    finally:
        print("7. SIGTERM to the runner: it drains and exits")
        code = stop_runner(runner)
        print(f"   runner exit code: {code}")
        shutil.rmtree(work, ignore_errors=True)
    if code != 0:
        raise DemoFailed(f"the runner exited with code {code}")
    print("outcome: as expected (202 then copied, 422, 503)")
    return 0


@contextlib.contextmanager
def serve_app(
    env: dict[str, str] | None = None, app: str = "examples.web_publisher.app:app"
) -> Iterator[str]:
    """Run `app` under uvicorn in a subprocess; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    environment = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(command, cwd=ROOT, env=environment)
    base = f"http://127.0.0.1:{port}"
    try:

        def answering() -> bool:
            if server.poll() is not None:
                raise DemoFailed(f"uvicorn exited with code {server.returncode}; see above")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{base}/openapi.json", timeout=2),
            ):
                return True
            return False

        wait(answering, "the app to answer")
        yield base
    finally:
        server.send_signal(signal.SIGTERM)  # uvicorn runs the app's shutdown, then exits
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def post(url: str, payload: Any) -> tuple[int, Any]:
    """POST `payload` as JSON; returns the status and the decoded answer, errors included."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def expect(what: str, status: int, wanted: int, body: Any) -> None:
    if status != wanted:
        raise DemoFailed(f"{what}: expected HTTP {wanted}, got {status}: {body}")


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
