"""The scheduler's process under `amqp-listener run`: started beside the workers, gone with
the runner.

A process of its own (a fresh interpreter that imports the application's modules again)
rather than a thread in the supervisor: the supervisor forks workers, and a thread holding
a connection across a fork leaves copies of its socket in every worker. The process asks the
kernel to kill it when the runner dies (kill -9 included), so that its connection closes and
the broker hands the lead to another runner at once; it lives in its own process group, and
the runner stops it with SIGTERM when it exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from listener.scheduler import Scheduler, scheduled

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.settings import Settings

__all__ = ["main", "start", "stop"]

log = logging.getLogger("listener.scheduler")

_STOP_WAIT = 5.0


def start(
    modules: Sequence[str],
    names: Sequence[str] | None,
    listeners: Sequence[type[Listener]],
    settings: Settings,
    log_level: str = "info",
    log_format: str = "text",
) -> subprocess.Popen[bytes] | None:
    """Start the scheduler process when any of `listeners` has a schedule; else None. It
    logs as the runner does (`log_level`, `log_format`)."""
    if not scheduled(listeners):
        return None
    from listener.runner.children import die_with_parent

    parent = os.getpid()
    env = {
        **os.environ,
        # The runner's settings as resolved (its --url included), never on the command line.
        "AMQP_URL": settings.url.get_secret_value(),
        "AMQP_LISTENER_QUEUE_TYPE": settings.queue_type,
        "AMQP_LISTENER_SCHEDULE_TIMEZONE": settings.schedule_timezone,
    }
    argv = [sys.executable, "-m", "listener._scheduler_process", *modules]
    argv += ["--log-level", log_level, "--log-format", log_format]
    for name in names or ():
        argv += ["--listener", name]
    process = subprocess.Popen(
        argv,
        env=env,
        cwd=os.getcwd(),
        stdin=subprocess.DEVNULL,
        process_group=0,
        # Safe here: the runner starts no thread before this (the supervisor forks later).
        preexec_fn=lambda: die_with_parent(parent),
    )
    log.info("scheduler pid=%d started for %d schedule(s)", process.pid, len(scheduled(listeners)))
    return process


def stop(process: subprocess.Popen[bytes] | None) -> None:
    """Stop the scheduler process: SIGTERM, then SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(_STOP_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: Sequence[str]) -> int:
    """`python -m listener._scheduler_process MODULE ... [--listener NAME ...]`."""
    from listener import registry
    from listener.cli import _configure_logging
    from listener.settings import get_settings

    modules: list[str] = []
    options: dict[str, list[str]] = {"--listener": [], "--log-level": [], "--log-format": []}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in options and args:
            options[arg].append(args.pop(0))
        else:
            modules.append(arg)
    _configure_logging(
        (options["--log-level"] or ["info"])[-1], (options["--log-format"] or ["text"])[-1]
    )
    names = options["--listener"]
    sys.path.insert(0, os.getcwd())
    listeners = registry.select(registry.discover(modules), names)

    async def serve() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await Scheduler(listeners, get_settings()).run(stopping)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
