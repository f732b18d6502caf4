"""The database goes away while messages flow: handling goes on, records wait in a bounded
buffer, what overflows is dropped and counted, and the ledger reports a gap for that time."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from support.proxy import TcpProxy
from support.waiting import eventually
from typer.testing import CliRunner

from listener import Listener, jobs
from listener import recorder as recorder_module
from listener.cli import app
from listener.database import create_engine
from listener.recording import LedgerMiddleware
from listener.settings import Settings

pytestmark = pytest.mark.slow

_DROPPED = "amqp_listener_ledger_dropped_records_total"


@pytest.fixture
def proxied(postgres_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """The session's PostgreSQL database behind a proxy the test can cut."""
    from support.databases import empty_ledger

    empty_ledger(postgres_url)
    with TcpProxy(target_port=make_url(postgres_url).port or 5432) as proxy:
        url = make_url(postgres_url).set(host="127.0.0.1", port=proxy.port)
        yield proxy, url.render_as_string(hide_password=False)


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = create_engine(postgres_url)
    yield engine
    engine.dispose()


async def test_a_database_outage_never_stops_handling_and_leaves_a_reported_gap(
    proxied: tuple[TcpProxy, str],
    postgres_url: str,
    engine: Engine,
    settings: Settings,
    run_worker: Any,
    unique: str,
) -> None:
    proxy, url = proxied
    handled: list[int] = []

    class Counter(Listener):
        subscribes_to = f"{unique}.count"
        queue = f"{unique}.count"
        concurrency = 50

        async def handle(self, message: int) -> None:
            handled.append(message)

    # 100 records at most: 150 messages make 300 records while the database is away.
    worker_settings = settings.with_database_url(url).model_copy(update={"ledger_buffer": 100})
    ledger = LedgerMiddleware(worker_settings)
    dropped_before = recorder_module.METRICS.get_sample_value(_DROPPED) or 0.0
    async with run_worker(Counter, middleware=[ledger]):
        before = await Counter.anotify_many(range(5))
        await eventually(lambda: len(handled) == 5)
        recorder = ledger.recorder
        assert recorder is not None
        assert await asyncio.to_thread(recorder.flush)

        proxy.reset()
        proxy.cut_after(0)  # the database is away: every connection fails
        outage_began = dt.datetime.now(dt.UTC)
        await Counter.anotify_many(range(5, 155))
        await eventually(lambda: len(handled) == 155, timeout=30)
        assert recorder.dropped > 0
        assert len(recorder._records) == 100  # what waits is bounded

        proxy.pass_through()
        assert await asyncio.to_thread(recorder.flush, 30)

    assert sorted(handled) == list(range(155))
    assert (
        recorder_module.METRICS.get_sample_value(_DROPPED) or 0.0
    ) - dropped_before == recorder.dropped
    [gap] = jobs.gaps_since(outage_began - dt.timedelta(seconds=1), engine=engine)
    assert gap.started_at >= outage_began - dt.timedelta(seconds=1)
    assert gap.dropped == recorder.dropped
    # The records that waited were written: the first messages of the outage are there.
    written = jobs.find(listener=Counter, limit=1000, engine=engine)
    assert {job.message_id for job in written} >= set(before)
    assert 5 < len(written) < 155

    result = CliRunner().invoke(
        app, ["jobs", "list", Counter.name(), "--database-url", postgres_url]
    )
    assert result.exit_code == 0, result.output
    assert "gap: " in result.output
    assert f"{gap.dropped} record(s) dropped" in result.output
