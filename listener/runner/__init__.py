"""The runner: worker processes that host listeners (the CLI's `run` command)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from listener.runner.worker import Worker
from listener.settings import Settings

if TYPE_CHECKING:
    from listener.listener import Listener

__all__ = ["Worker", "run_worker"]


def run_worker(
    listeners: Sequence[type[Listener]], settings: Settings, *, fail_fast: bool = False
) -> int:
    """Run one worker in this process until it is stopped; returns the exit code."""
    return asyncio.run(Worker(listeners, settings, fail_fast=fail_fast).run())
