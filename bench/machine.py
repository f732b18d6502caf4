"""What a run was measured on and with: the header of the table and of the JSON document."""

from __future__ import annotations

import datetime as dt
import os
import platform
from importlib import metadata
from typing import Any

from bench.cases import uvloop_available
from bench.measure import Plan
from bench.report import CaseResult
from listener.settings import redact_url

__all__ = ["describe", "lines"]


def describe(
    plan: Plan,
    repeats: int,
    results: list[CaseResult],
    broker_version: str,
    load_before: tuple[float, ...],
) -> dict[str, Any]:
    """The parameters, the versions, the machine and its load, the framework's event loop
    (as its async handlers saw it)."""
    loops = {
        loop
        for result in results
        if result.case.listener
        for run in result.runs
        for loop in run.get("loop", [])
        if loop != "thread"
    }
    peers = sorted({result.case.peer for result in results if result.case.peer})
    return {
        "n": plan.n,
        "prefetch": plan.prefetch,
        "repeats": repeats,
        "serial_n": plan.serial_n,
        "window": plan.window,
        "latency_rate": plan.latency_rate,
        "latency_n": plan.latency_n,
        "python": platform.python_version(),
        "versions": {
            name: metadata.version(name) for name in ("aio-pika", "pika", "pydantic", *peers)
        },
        "uvloop_installed": uvloop_available(),
        "framework_loop": sorted(loops),
        "rabbitmq": broker_version,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "url": redact_url(plan.url),
    }


def lines(header: dict[str, Any]) -> list[str]:
    """The header as three lines of text."""
    versions = header["versions"]
    peers = "".join(
        f", {name} {version}"
        for name, version in versions.items()
        if name not in ("aio-pika", "pika", "pydantic")
    )
    loop = ", ".join(header["framework_loop"]) or "not seen"
    uvloop = "installed" if header["uvloop_installed"] else "not installed"
    return [
        f"amqp-listener bench  N={header['n']:,}  prefetch={header['prefetch']}  "
        f"repeats={header['repeats']} (medians; a ratio is the median of the per-repeat "
        "ratios)  one-at-a-time publish: "
        f"{header['serial_n']:,} x {header['repeats'] * 3} runs  "
        f"windows of {header['window']}  latency: "
        f"{header['latency_n']:,} probes at {header['latency_rate']:g}/s",
        f"Python {header['python']}, aio-pika {versions['aio-pika']}, pika {versions['pika']}, "
        f"pydantic {versions['pydantic']}{peers}, RabbitMQ {header['rabbitmq']}; framework event "
        f"loop: {loop}; uvloop {uvloop}",
        f"{header['cpus']} CPUs, load average {_load(header['load_before'])} before and "
        f"{_load(header['load_after'])} after; {header['date']}; {header['url']}",
    ]


def _load(load: tuple[float, ...]) -> str:
    return " ".join(f"{x:.2f}" for x in load)
