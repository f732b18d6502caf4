"""The event loop workers and background publishing run on: uvloop when it is installed,
unless told otherwise.

uvloop runs the same asyncio code with its loop written in C, which takes a good part of
the cost off every delivery. The `event_loop` setting picks `asyncio` to rule it out (for
a suspected loop bug, or a debugger that needs the pure-Python loop).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from listener.errors import ConfigurationError
from listener.settings import Settings

__all__ = ["loop_factory", "run"]

T = TypeVar("T")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop constructor for `choice` (`auto`, `uvloop` or `asyncio`).

    Raises:
        ConfigurationError: `uvloop` was asked for and is not installed.
    """
    uvloop_installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not uvloop_installed:
        raise ConfigurationError(
            "AMQP_LISTENER_EVENT_LOOP=uvloop but uvloop is not installed: "
            "pip install 'amqp-listener[fast]', or set it to auto or asyncio"
        )
    if choice != "asyncio" and uvloop_installed:
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], settings: Settings) -> T:
    """`asyncio.run(main)` on the loop the settings choose."""
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        return runner.run(main)
