"""`python -m bench` (`make bench`): measure, then print the table or `--json`.

Progress goes to stderr, the table (or the JSON document) to stdout. Ctrl-C or SIGTERM
stops the measured processes, deletes every `bench-` queue and exchange, and exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import pika.exceptions

from bench import machine, profiling
from bench.broker import Broker
from bench.cases import CASES, GROUPS, Case, select
from bench.measure import Plan, RunFailed, Runner
from bench.report import CaseResult, rows, table
from bench.wire import url as default_url
from listener.settings import redact_url


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="amqp-listener against hand-written aio-pika and pika, ratios to "
        "baselines measured in the same run.",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=20_000,
        help="messages per consume and batch-publish run (default 20000)",
    )
    parser.add_argument("--prefetch", type=int, default=100, help="per consumer (default 100)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs per case; the table shows medians (default 5)"
    )
    parser.add_argument(
        "--cases",
        default="",
        help=f"comma-separated case ids, their baselines added: {', '.join(c.id for c in CASES)}",
    )
    parser.add_argument(
        "--case-timeout",
        type=float,
        default=300.0,
        help="seconds one case may take over all its runs; past it the case is reported "
        "as timed out (default 300)",
    )
    parser.add_argument(
        "--serial-n",
        type=int,
        default=None,
        help="messages per one-at-a-time publish run (default: N, at most 2000; that group "
        "runs three times as many repeats)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=1000,
        help="batch size of the pipelined publishes (default 1000)",
    )
    parser.add_argument(
        "--latency-rate", type=float, default=500.0, help="probes per second (default 500)"
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=10.0,
        help="how long probes are sent (default 10; at most N probes)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: Python calls per consumed message, raw aio-pika vs the "
        "async no-op handler",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--url",
        default=default_url(),
        help="broker (default: AMQP_URL, or the local broker); for the framework cases, a "
        "comma-separated list of a cluster's nodes may be given",
    )
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be at least 2: a rate needs a first and a last message")
    for name in ("prefetch", "repeats", "window"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    known = [case.id for case in CASES]
    unknown = [c for c in args.cases.split(",") if c and c not in known]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; the cases are: {', '.join(known)}")
    return args


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _interrupted(_signum: int, _frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def _describe(case: Case, run: dict[str, Any]) -> str:
    if case.group == "latency":
        return f"p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms"
    return f"{run['rate']:,.0f} msgs/s ({run['messages']} messages in {run['seconds']:.2f}s)"


#: How many times more repeats the one-at-a-time publish group runs.
SERIAL_REPEAT_FACTOR = 3


def measure(runner: Runner, cases: list[Case], repeats: int, budget: float) -> list[CaseResult]:
    """Run every case `repeats` times, group by group, the cases of a group interleaved.

    The order within a group reverses every repeat (A B, B A, A B, ...): the broker is still
    cleaning up the queues the previous run deleted, and a fixed order would hand that cost
    to the same case every time.
    """
    results = {case.id: CaseResult(case) for case in cases}
    for group in GROUPS:
        members = [case for case in cases if case.group == group]
        # One-at-a-time publishing waits on the broker's disk for every message, and that
        # pace drifts by tens of percent within seconds: more, shorter runs side by side.
        runs = repeats * SERIAL_REPEAT_FACTOR if group == "serial" else repeats
        for repeat in range(1, runs + 1):
            for case in members if repeat % 2 else members[::-1]:
                result = results[case.id]
                if result.status != "ok":
                    continue
                started, used = time.monotonic(), len(runner.declared)
                try:
                    run = runner.run(case, started + budget - result.spent)
                except TimeoutError as exc:
                    result.status, result.error = "timed out", f"run {repeat}: {exc}"
                except RunFailed as exc:
                    result.status, result.error = "failed", f"run {repeat}: {exc}"
                else:
                    result.runs.append(run)
                finally:
                    result.spent += time.monotonic() - started
                    result.declared.extend(runner.declared[used:])
                done = _describe(case, run) if result.status == "ok" else result.status
                _progress(f"[{group} {repeat}/{runs}] {case.label}: {done}")
    return list(results.values())


def profile(runner: Runner, budget: float) -> list[CaseResult]:
    """One profiled consume run each of raw aio-pika and the async no-op handler."""
    results = []
    for case in select(["async"]):  # and its baseline, raw aio-pika
        _progress(f"profiling {case.label}")
        run = runner.run(case, time.monotonic() + budget, profile=True)
        results.append(CaseResult(case, [run]))
    return results


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    cases = select([c for c in args.cases.split(",") if c])
    latency_n = min(args.n, max(1, round(args.latency_rate * args.latency_seconds)))
    serial_n = args.serial_n or min(args.n, 2000)
    plan = Plan(
        args.url, args.n, args.prefetch, serial_n, args.window, args.latency_rate, latency_n
    )
    signal.signal(signal.SIGTERM, _interrupted)
    load = os.getloadavg()
    broker = Broker(plan.url)
    runner: Runner | None = None
    try:
        broker_version = broker.server_version()
        with tempfile.TemporaryDirectory(prefix="amqp-listener-bench-") as workdir:
            runner = Runner(plan, broker, Path(workdir))
            if args.profile:
                results = profile(runner, args.case_timeout)
            else:
                results = measure(runner, cases, args.repeats, args.case_timeout)
    except KeyboardInterrupt:
        _progress("interrupted: measured processes stopped, bench- queues deleted")
        return 130
    except pika.exceptions.AMQPConnectionError as exc:
        _progress(
            f"cannot reach RabbitMQ at {redact_url(plan.url)} ({type(exc).__name__}): "
            "start it (make rabbitmq) or set AMQP_URL"
        )
        return 1
    except (RunFailed, TimeoutError) as exc:
        _progress(f"failed: {exc}")
        return 1
    finally:
        if runner is not None:
            runner.ledgers.close()
        try:
            broker.delete_all()
        except pika.exceptions.AMQPError as exc:
            left = ", ".join(broker.leftovers())
            _progress(f"could not delete {left} ({exc!r}): delete them by hand")
    header = machine.describe(plan, args.repeats, results, broker_version, load)
    if args.profile:
        summaries = {r.case.id: {"label": r.case.label, **r.runs[0]["profile"]} for r in results}
        document: dict[str, Any] = {"header": header, "profile": summaries}
        lines = [
            f"amqp-listener bench --profile  N={plan.n:,}  prefetch={plan.prefetch}  "
            "(cProfile of the event loop's thread, first to last message)",
            *machine.lines(header)[1:],
        ]
        text = "\n\n".join(
            ["\n".join(lines), *(profiling.render(s["label"], s) for s in summaries.values())]
        )
    else:
        made = rows(results)
        document = {
            "header": header,
            "rows": [row.to_json() for row in made],
            "cases": {r.case.id: r.to_json() for r in results},
        }
        text = table(made, machine.lines(header))
        problems = [f"{r.case.id}: {r.status}: {r.error}" for r in results if r.status != "ok"]
        if problems:
            text += "\n\n" + "\n".join(problems)
    print(json.dumps(document, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
