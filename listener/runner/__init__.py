"""The runner: worker processes that host listeners (the CLI's `run` command).

`run()` is the entry point: a supervisor with N worker processes (see
`listener.runner.supervisor`). `Worker` hosts listeners inside the current process, for tests
and for programs that embed a worker in their own event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from listener import _loop as loop
from listener.errors import ConfigurationError
from listener.runner import supervisor
from listener.runner.worker import Worker
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener
    from listener.metrics import MultiprocessEndpoint

__all__ = ["Worker", "run", "run_worker"]

log = logging.getLogger("listener.supervisor")


def run(
    listeners: Sequence[type[Listener]],
    settings: Settings,
    *,
    workers: int = 1,
    fail_fast: bool = False,
    metrics: MultiprocessEndpoint | None = None,
) -> int:
    """Host `listeners` in `workers` supervised worker processes until stopped.

    With `metrics` (an opened endpoint), every worker counts into it and one process serves
    the sum of all of them.

    Returns the process exit code: 0 after a clean stop, 1 when a worker did not stop cleanly,
    128+signum after a second signal or SIGQUIT. Call it from the main thread, with no event
    loop running.

    Raises:
        BrokerUnreachable, AuthenticationFailed, TopologyMismatch: at start-up, once.
        ConfigurationError: `workers` is below 1, or above 1 (or metrics are asked for)
            where processes cannot be supervised (not Linux).
    """
    if workers < 1:
        raise ConfigurationError(f"--workers must be at least 1, not {workers}")
    if any(cls.idempotent for cls in listeners):  # the database is an optional extra
        from listener.inbox import check_listeners

        check_listeners(listeners, settings)
    loop.loop_factory(settings.event_loop)  # an unusable choice fails here, once
    if not supervisor.supported():
        if workers > 1 or metrics is not None or settings.health_port is not None:
            raise ConfigurationError(
                "--workers above 1, --metrics-port and --health-port need Linux (fork and prctl)"
            )
        if settings.outbox_relay:
            raise ConfigurationError("run --outbox needs Linux: run `amqp-listener relay` instead")
        log.warning("worker processes cannot be supervised on this platform; running one")
        return run_worker(listeners, settings, fail_fast=fail_fast)
    return supervisor.supervise(
        listeners, settings, workers=workers, fail_fast=fail_fast, metrics=metrics
    )


def run_worker(
    listeners: Sequence[type[Listener]], settings: Settings, *, fail_fast: bool = False
) -> int:
    """Run one worker in this process, unsupervised, until it is stopped; the exit code."""
    return loop.run(Worker(listeners, settings, fail_fast=fail_fast).run(), settings)
