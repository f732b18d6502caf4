"""The job ledger's reads at scale: `python -m bench.ledger_store [--rows 1000000]`.

Fills a scratch PostgreSQL database (`BENCH_POSTGRES_URL` names the server) with `--rows`
attempt rows, server-side: two attempts per message (a retry, then handled or, for one in
twenty, parked), one tag per message among 10,000 accounts. Then times what the commands
run, `jobs show ID` (`listener.jobs.show`) and `jobs list --tag T --state parked`
(`listener.jobs.find`), medians of 20 calls on a warm connection, and measures the bytes
per attempt row (the heap's size over its rows, indexes excluded). The database is dropped
at the end.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.ledgers import Ledgers

_FILL = """
INSERT INTO amqp_listener_attempts (message_id, listener, queue, attempt, outcome, host, pid,
    started_at, finished_at, duration, next_queue, exception_type, exception_message)
SELECT md5((g / 2)::text), 'myapp.listeners:Orders', 'orders', g % 2 + 1,
    CASE WHEN g % 2 = 0 THEN 'retried' WHEN g % 40 = 1 THEN 'parked' ELSE 'handled' END,
    'worker-' || (g % 8), 1000 + g % 50,
    now() - (:rows - g) * interval '10 ms', now() - (:rows - g) * interval '10 ms', 0.012,
    CASE WHEN g % 2 = 0 THEN 'orders.retry.5s' WHEN g % 40 = 1 THEN 'orders.dead' END,
    CASE WHEN g % 2 = 0 OR g % 40 = 1 THEN 'builtins.TimeoutError' END,
    CASE WHEN g % 2 = 0 OR g % 40 = 1 THEN 'the upstream did not answer in 30 s' END
FROM generate_series(0, :rows - 1) AS g
"""
_TAGS = """
INSERT INTO amqp_listener_tags (tag, message_id, listener, created_at)
SELECT 'Account:' || (m % 10000), md5(m::text), 'myapp.listeners:Orders', now()
FROM generate_series(0, :rows / 2 - 1) AS m
"""
_ROW_BYTES = """
SELECT pg_relation_size('amqp_listener_attempts')::float / count(*),
       avg(pg_column_size(a.*))
FROM amqp_listener_attempts AS a
"""


def _median_ms(call: Callable[[], Any], times: int = 20) -> float:
    call()  # warm: plans and caches, as a second run of a command would have them
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_store")
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    from sqlalchemy import text

    from listener import jobs
    from listener.database import create_engine

    ledgers = Ledgers()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            url = ledgers.url("postgresql", Path(scratch))
        engine = create_engine(url)
        started = time.monotonic()
        with engine.begin() as connection:
            connection.execute(text(_FILL), {"rows": args.rows})
            connection.execute(text(_TAGS), {"rows": args.rows})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE")
            heap, tuple_bytes = connection.execute(text(_ROW_BYTES)).one()
        print(f"filled {args.rows:,} attempt rows in {time.monotonic() - started:.0f} s")
        some_id = jobs.find(tag="Account:40", state="parked", engine=engine)[0].message_id
        show = _median_ms(lambda: jobs.show(some_id, engine=engine))
        listed = _median_ms(lambda: jobs.find(tag="Account:40", state="parked", engine=engine))
        recent = _median_ms(
            lambda: jobs.find(listener="myapp.listeners:Orders", limit=50, engine=engine), 3
        )
        parked = _median_ms(lambda: jobs.find(state="parked", limit=50, engine=engine), 3)
        print(f"jobs show ID                           {show:7.1f} ms  (goal < 50 ms)")
        print(f"jobs list --tag T --state parked       {listed:7.1f} ms  (goal < 100 ms)")
        print(f"jobs list TARGET --limit 50             {recent:7.1f} ms")
        print(f"jobs list --state parked --limit 50     {parked:7.1f} ms")
        print(
            f"bytes per attempt row, indexes excluded {heap:6.0f} heap, "
            f"{tuple_bytes:.0f} per tuple  (goal <= 300)"
        )
        engine.dispose()
    finally:
        ledgers.close()


if __name__ == "__main__":
    main()
