"""Middleware hooks, the outcome log line and tracing, against the real broker."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

import listener
from listener import Listener, Middleware
from listener.middleware import OutcomeLog
from listener.tracing import Tracing

ROOT = Path(__file__).resolve().parents[1]


class Item(BaseModel):
    n: int
    mode: str = "ok"


class Recorder(Middleware):
    def __init__(self, name: str, calls: list[tuple[str, ...]]) -> None:
        self.name = name
        self.calls = calls

    def on_worker_start(self, worker):
        self.calls.append((self.name, "start"))

    def on_worker_stop(self, worker):
        self.calls.append((self.name, "stop"))

    def before_handle(self, delivery):
        self.calls.append((self.name, "before", str(delivery.attempt)))

    def after_handle(self, delivery, *, outcome, failure, duration):
        assert duration >= 0
        kind = failure.kind if failure else "-"
        self.calls.append((self.name, "after", str(delivery.attempt), outcome, kind))

    def on_retry(self, delivery, *, delay, failure):
        self.calls.append((self.name, "retry", f"{delay:g}"))

    def on_park(self, delivery, *, reason, failure):
        self.calls.append((self.name, "park", reason))


class Crashing(Middleware):
    def before_handle(self, delivery):
        raise RuntimeError("middleware bug")

    def after_handle(self, delivery, *, outcome, failure, duration):
        raise RuntimeError("middleware bug")


async def _until(check, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def flaky_listener(unique: str) -> type[Listener]:
    class Flaky(Listener):
        subscribes_to = f"{unique}.item"
        queue = f"{unique}.flaky"
        max_attempts = 2
        retry_delays = (0.1,)

        async def handle(self, message: Item) -> None:
            if message.mode == "fail":
                raise ValueError("boom")

    return Flaky


async def test_hooks_run_in_order_before_and_reversed_after(unique, rabbit, run_worker, settings):
    calls: list[tuple[str, ...]] = []
    cls = flaky_listener(unique)

    async with run_worker(cls, middleware=[Recorder("a", calls), Recorder("b", calls)]) as worker:
        await cls.anotify(n=1)
        await _until(lambda: worker.consumers[0].counts["handled"] == 1, "the message")
    assert calls[:2] == [("a", "start"), ("b", "start")]
    assert calls[2:6] == [
        ("a", "before", "1"),
        ("b", "before", "1"),
        ("b", "after", "1", "handled", "-"),
        ("a", "after", "1", "handled", "-"),
    ]
    assert calls[-2:] == [("b", "stop"), ("a", "stop")]


async def test_hooks_see_retries_and_parking_with_attempt_numbers(unique, rabbit, run_worker):
    calls: list[tuple[str, ...]] = []
    cls = flaky_listener(unique)

    async with run_worker(cls, middleware=[Recorder("r", calls)]) as worker:
        await cls.anotify(n=1, mode="fail")
        await _until(lambda: worker.consumers[0].counts["parked"] == 1, "the park")

    delivery_calls = [c for c in calls if c[1] not in ("start", "stop")]
    assert delivery_calls == [
        ("r", "before", "1"),
        ("r", "retry", "0.1"),
        ("r", "after", "1", "retried", "error"),
        ("r", "before", "2"),
        ("r", "park", "failed"),
        ("r", "after", "2", "parked", "error"),
    ]


async def test_a_crashing_middleware_is_logged_and_never_changes_the_outcome(
    unique, rabbit, run_worker, caplog
):
    cls = flaky_listener(unique)
    caplog.set_level(logging.ERROR, logger="listener.middleware")

    async with run_worker(cls, middleware=[Crashing()]) as worker:
        await cls.anotify(n=1)
        await _until(lambda: worker.consumers[0].counts["handled"] == 1, "the message")

    assert rabbit.count(f"{cls.queue}.dead") == 0
    failures = [r for r in caplog.records if "Crashing.before_handle failed" in r.getMessage()]
    assert failures and failures[0].exc_info is not None


def test_only_middleware_objects_can_be_added():
    with pytest.raises(TypeError):
        listener.add_middleware(object())  # type: ignore[arg-type]


async def test_the_outcome_log_has_one_line_per_outcome_with_fields_and_no_body(
    unique, rabbit, run_worker, caplog
):
    cls = flaky_listener(unique)
    caplog.set_level(logging.DEBUG, logger="listener.outcome")

    async with run_worker(cls, middleware=[OutcomeLog()]) as worker:
        await cls.anotify(n=111222333)
        await cls.anotify(n=444555666, mode="fail")
        await _until(
            lambda: (
                worker.consumers[0].counts["parked"] == 1
                and worker.consumers[0].counts["handled"] == 1
            ),
            "both outcomes",
        )

    records = [r for r in caplog.records if r.name == "listener.outcome"]
    outcomes = [(r.levelname, r.outcome, r.attempt) for r in records]  # type: ignore[attr-defined]
    assert outcomes == [
        ("DEBUG", "handled", 1),
        ("WARNING", "retried", 1),
        ("ERROR", "parked", 2),
    ]
    assert records[1].exception_type == "ValueError"  # type: ignore[attr-defined]
    assert "retry in 0.1s" in records[1].getMessage()
    text = "\n".join(r.getMessage() for r in records)
    assert "111222333" not in text and "444555666" not in text


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.mark.parametrize("sync_handler", [False, True], ids=["async", "sync"])
async def test_one_trace_spans_the_publisher_and_every_attempt(
    unique, rabbit, run_worker, spans, sync_handler
):
    provider, exporter = spans
    seen: list[int] = []

    class Traced(Listener):
        subscribes_to = f"{unique}.item"
        queue = f"{unique}.traced"
        max_attempts = 2
        retry_delays = (0.1,)

        if sync_handler:

            def handle(self, message: Item) -> None:
                seen.append(trace.get_current_span().get_span_context().trace_id)
                if len(seen) == 1:
                    raise ValueError("first attempt fails")

        else:

            async def handle(self, message: Item) -> None:
                seen.append(trace.get_current_span().get_span_context().trace_id)
                if len(seen) == 1:
                    raise ValueError("first attempt fails")

    tracer = provider.get_tracer("test")
    async with run_worker(Traced, middleware=[Tracing(provider)]) as worker:
        with tracer.start_as_current_span("request") as request:
            await Traced.anotify(n=1)
        await _until(lambda: worker.consumers[0].counts["handled"] == 1, "the retried message")

    trace_id = request.get_span_context().trace_id
    assert seen == [trace_id, trace_id]
    consumer = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.CONSUMER]
    assert len(consumer) == 2
    assert all(s.parent.span_id == request.get_span_context().span_id for s in consumer)
    assert [s.attributes["amqp_listener.outcome"] for s in consumer] == ["retried", "handled"]


def test_the_runner_writes_json_log_lines(unique, rabbit, amqp_url, tmp_path):
    module = tmp_path / f"{unique}_jsonapp.py"
    module.write_text(
        "from listener import Listener\n"
        "class JsonLogged(Listener):\n"
        f"    subscribes_to = '{unique}.item'\n"
        f"    queue = '{unique}.jsonlogged'\n"
        "    def handle(self, message) -> None: ...\n"
    )
    for suffix in ("", ".dead", ".retry.1s", ".retry.5s", ".retry.30s"):
        rabbit.queues.add(f"{unique}.jsonlogged{suffix}")
    rabbit.track_delay_entry(f"{unique}.jsonlogged", f"{unique}.item")
    rabbit.exchanges.add(unique)
    env = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
    }
    cli = str(Path(sys.executable).with_name("amqp-listener"))
    process = subprocess.Popen(
        [cli, "run", f"{unique}_jsonapp", "--log-format", "json", "--log-level", "debug"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 15
        while rabbit.consumers(f"{unique}.jsonlogged") == 0:
            assert time.monotonic() < deadline, "the runner did not start consuming"
            time.sleep(0.05)
        message_id = listener.publish(f"{unique}.item", {"n": 1})
        deadline = time.monotonic() + 10
        while rabbit.count(f"{unique}.jsonlogged") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=30)

    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines, err
    handled = [line for line in lines if line.get("outcome") == "handled"]
    assert handled and handled[0]["message_id"] == message_id
    assert {"time", "level", "logger", "message"} <= set(handled[0])
    assert "guest:guest@" not in err
