"""The web publisher example: 202 only once the broker confirmed, 422 for bad input with
nothing sent, 503 when the broker does not take the job, with no secret in the answer."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from support.proxy import TcpProxy
from support.waiting import eventually

from examples.file_copier.listeners import CopyRequest, FileCopier
from examples.web_publisher.app import app
from listener.testing import MemoryBroker


@asynccontextmanager
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The app in this process and event loop, started and stopped through its lifespan."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            yield http


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def order(tmp_path: Path, dst: str | None = None) -> dict[str, str]:
    (tmp_path / "a.pdf").write_text("the report\n")
    return {"src": str(tmp_path / "a.pdf"), "dst": dst or str(tmp_path / "b.pdf")}


# -- without a broker: input errors and an unreachable broker ------------------------------


async def test_a_relative_destination_is_a_422_and_nothing_is_sent(tmp_path: Path) -> None:
    with MemoryBroker(FileCopier) as broker:
        async with client() as http:
            answer = await http.post("/cases/7/copies", json=order(tmp_path, dst="b.pdf"))
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "dst"]
    assert broker.published == []


async def test_a_case_id_below_one_is_a_422(tmp_path: Path) -> None:
    with MemoryBroker(FileCopier) as broker:
        async with client() as http:
            answer = await http.post("/cases/0/copies", json=order(tmp_path))
    assert answer.status_code == 422
    assert broker.published == []


async def test_a_batch_the_listener_model_refuses_is_a_422_naming_the_field(
    tmp_path: Path,
) -> None:
    good = {"case_id": 1, **order(tmp_path)}
    bad = {"case_id": "seven", "src": "/a", "dst": "/b"}
    with MemoryBroker(FileCopier) as broker:
        async with client() as http:
            answer = await http.post("/copies", json=[good, bad])
    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert error["type"] == "invalid_message"
    assert "case_id" in error["msg"]
    assert "seven" not in error["msg"]  # values are never echoed by the framework
    assert broker.published == []  # a batch is validated before the first message is sent


async def test_an_unreachable_broker_is_a_503_without_the_password(
    tmp_path: Path, publish_to: Callable[..., None]
) -> None:
    publish_to(f"amqp://guest:url-secret@127.0.0.1:{closed_port()}/%2F", connect_timeout="2")
    async with client() as http:
        answer = await http.post("/cases/7/copies", json=order(tmp_path))
    assert answer.status_code == 503
    assert answer.json()["error"] == "PublishUnreachable"
    assert "not queued" in answer.json()["detail"]
    assert "message_id" not in answer.json()  # not sent at all: nothing to look for
    assert answer.headers["retry-after"] == "5"
    assert "url-secret" not in answer.text


# -- in memory: the happy paths -------------------------------------------------------------


async def test_a_copy_request_answers_the_message_id_and_the_job_runs(tmp_path: Path) -> None:
    with MemoryBroker(FileCopier, fail_fast=True) as broker:
        async with client() as http:
            answer = await http.post("/cases/7/copies", json=order(tmp_path))
        assert answer.status_code == 202
        [published] = broker.published
        assert answer.json() == {"message_id": published.message_id}
        assert published.exchange == "case_files"
        assert published.routing_key == "copy_requested"
        await broker.ajoin()
        assert broker.handled(FileCopier) == [
            CopyRequest(case_id=7, src=str(tmp_path / "a.pdf"), dst=str(tmp_path / "b.pdf"))
        ]
    assert (tmp_path / "b.pdf").read_text() == "the report\n"


async def test_a_batch_answers_every_message_id_in_order(tmp_path: Path) -> None:
    first = {"case_id": 1, **order(tmp_path)}
    second = {"case_id": 2, **order(tmp_path, dst=str(tmp_path / "c.pdf"))}
    with MemoryBroker(FileCopier) as broker:
        async with client() as http:
            answer = await http.post("/copies", json=[first, second])
        assert answer.status_code == 202
        assert answer.json()["message_ids"] == [m.message_id for m in broker.published]
        assert len(broker.published) == 2


# -- against RabbitMQ ------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_202_means_the_runner_gets_the_job(
    tmp_path: Path, publish_to: Callable[..., None], amqp_url: str, run_worker
) -> None:
    publish_to(amqp_url)
    async with run_worker(FileCopier), client() as http:
        answer = await http.post("/cases/7/copies", json=order(tmp_path))
        assert answer.status_code == 202
        await eventually(lambda: (tmp_path / "b.pdf").exists(), timeout=15)
    assert len(answer.json()["message_id"]) == 32


@pytest.mark.slow
async def test_a_confirm_that_never_comes_is_a_503_with_the_message_id(
    tmp_path: Path, publish_to: Callable[..., None], run_worker
) -> None:
    with TcpProxy() as proxy:
        publish_to(f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F", confirm_timeout="1")
        async with run_worker(FileCopier), client() as http:
            assert (await http.post("/cases/7/copies", json=order(tmp_path))).status_code == 202
            proxy.blackhole()  # nothing gets through now: no confirm can come back
            answer = await http.post("/cases/8/copies", json=order(tmp_path))
            proxy.reset()  # lets the app's shutdown close its connection at once
    assert answer.status_code == 503
    body = answer.json()
    assert body["error"] == "PublishTimeout"
    assert "may have been queued" in body["detail"]
    assert len(body["message_id"]) == 32


@pytest.mark.slow
def test_the_demo_serves_the_app_for_real(
    run_demo: Callable[[str], subprocess.CompletedProcess[str]],
) -> None:
    result = run_demo("examples.web_publisher.demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-> 202 {'message_id': " in result.stdout
    assert "4. handled by the runner: report.copy.pdf written" in result.stdout
    assert "-> 422, nothing sent" in result.stdout
    assert "-> 503 {'error': 'PublishUnreachable'" in result.stdout
    assert "demo-secret" not in result.stdout + result.stderr
    assert "outcome: as expected" in result.stdout
