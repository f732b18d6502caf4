"""What the example demos share: a runner in a subprocess, waiting on the broker, peeking at
parked messages, and cleaning up.

The demos talk to RabbitMQ with plain pika, from outside the framework, so that what they
print is what the broker holds, not what the framework believes.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pika
import pika.exceptions

from listener import Listener
from listener.settings import redact_url

__all__ = [
    "ROOT",
    "Broker",
    "DemoFailed",
    "line_buffered_stdout",
    "start_runner",
    "stop_runner",
    "wait",
]

ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")


class DemoFailed(SystemExit):
    """The demo did not see what it expected; the text says what, and exits non-zero."""

    def __init__(self, what: str) -> None:
        super().__init__(f"demo failed: {what}")


def wait(check: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    """Poll `check` until it returns something truthy; fail the demo after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def line_buffered_stdout() -> None:
    """Print each line at once, also into a pipe, so it interleaves with the runner's log."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


def start_runner(
    modules: Iterable[str], *, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`amqp-listener run MODULE ...` from the repository root, logging to our stderr."""
    command = [str(Path(sys.executable).with_name("amqp-listener")), "run", *modules]
    environment = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=environment)


def stop_runner(runner: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM: the runner drains its in-flight messages and exits; returns its exit code."""
    if runner.poll() is None:
        runner.send_signal(signal.SIGTERM)
    try:
        return runner.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        runner.kill()  # unacked messages go back to their queues: nothing is lost
        runner.wait()
        return -signal.SIGKILL


class Broker:
    """A plain pika connection to look at queues the way an operator would."""

    def __init__(self, url: str) -> None:
        try:
            self.connection = pika.BlockingConnection(pika.URLParameters(url))
        except pika.exceptions.AMQPError as error:
            raise DemoFailed(
                f"no RabbitMQ answers at {redact_url(url)} ({type(error).__name__}): start it "
                "(make rabbitmq) or point AMQP_URL at one"
            ) from None

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.connection.close()

    def consumers(self, queue: str) -> int:
        """Consumers on `queue`; 0 while it is not declared yet."""
        channel = self.connection.channel()  # a passive declare of a missing queue closes it
        try:
            return int(channel.queue_declare(queue, passive=True).method.consumer_count or 0)
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        finally:
            if channel.is_open:
                channel.close()

    def wait_consuming(
        self, runner: subprocess.Popen[bytes], listeners: Iterable[type[Listener]]
    ) -> None:
        """Wait until the runner consumes every listener's queue; fail if it exits."""

        def consuming() -> bool:
            if runner.poll() is not None:
                raise DemoFailed(f"the runner exited with code {runner.returncode}; see above")
            return all(self.consumers(cls.queue) > 0 for cls in listeners)

        wait(consuming, "the runner to start consuming")

    def parked(self, queue: str) -> dict[str, dict[str, Any]]:
        """The messages parked in `<queue>.dead`, as {message_id: headers}, left in place.

        AMQP cannot browse a queue: take every message without acking it, then hand them
        all back, which leaves the queue as it was.
        """
        channel = self.connection.channel()
        found: dict[str, dict[str, Any]] = {}
        last_tag = None
        try:
            while True:
                method, properties, _body = channel.basic_get(f"{queue}.dead")
                if method is None or properties is None:
                    break
                last_tag = method.delivery_tag
                found[str(properties.message_id)] = dict(properties.headers or {})
            if last_tag is not None:
                channel.basic_nack(last_tag, multiple=True, requeue=True)
        finally:
            if channel.is_open:
                channel.close()
        return found

    def delete(self, listeners: Iterable[type[Listener]]) -> None:
        """Delete the listeners' queues, their keys into the shared delay levels, and their
        exchanges once nothing else is bound."""
        channel = self.connection.channel()
        exchanges = set()
        for cls in listeners:
            topology = cls.topology()
            exchanges.add(topology.exchange)
            for spec in topology.queues:
                channel.queue_delete(spec.name)
            for binding in topology.delay_bindings:
                if binding.to_exchange:
                    channel.exchange_unbind(binding.destination, binding.source, binding.key)
        for exchange in sorted(exchanges):
            try:
                channel.exchange_delete(exchange, if_unused=True)
            except pika.exceptions.ChannelClosedByBroker:
                channel = self.connection.channel()  # still in use by another application
        if channel.is_open:
            channel.close()
