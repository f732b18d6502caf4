"""What every demo shares: without a broker it says so in one line and exits 1."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable

import pytest

DEMOS = [
    "examples.file_copier.demo",
    "examples.provisioning.demo",
    "examples.web_publisher.demo",
    "examples.orders.demo",
]


@pytest.mark.slow
@pytest.mark.parametrize("module", DEMOS)
def test_without_a_broker_the_demo_says_so_and_exits_1(
    module: str, run_demo: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_demo(module, url=f"amqp://guest:demo-password@127.0.0.1:{port}/%2F")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"demo failed: no RabbitMQ answers at amqp://guest:***@127.0.0.1:{port}/%2F "
        "(AMQPConnectionError): start it (make rabbitmq) or point AMQP_URL at one"
    )
    assert "demo-password" not in result.stdout + result.stderr
