"""Which event loop a worker runs on: uvloop when installed, unless the settings say not."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import uvloop

from listener import ConfigurationError, Settings
from listener import _loop as loop
from listener.settings import get_settings


def _loop_type(settings: Settings) -> type[asyncio.AbstractEventLoop]:
    async def which() -> type[asyncio.AbstractEventLoop]:
        return type(asyncio.get_running_loop())

    return loop.run(which(), settings)


def test_asking_for_uvloop_where_it_is_not_installed_fails_with_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    with pytest.raises(ConfigurationError, match=r"uvloop is not installed.*amqp-listener\[fast\]"):
        loop.loop_factory("uvloop")
    # auto falls back quietly
    assert loop.loop_factory("auto") is asyncio.new_event_loop


def test_an_unknown_loop_name_is_refused_by_the_settings(monkeypatch):
    monkeypatch.setenv("AMQP_LISTENER_EVENT_LOOP", "trio")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match=r"event_loop: Input should be .auto."):
            get_settings()
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    ("choice", "expected"), [("auto", uvloop.Loop), ("uvloop", uvloop.Loop), ("asyncio", None)]
)
def test_the_worker_loop_follows_the_event_loop_setting(choice, expected):
    kind = _loop_type(Settings(event_loop=choice))
    if expected is None:
        assert not issubclass(kind, uvloop.Loop)
        assert issubclass(kind, asyncio.BaseEventLoop)
    else:
        assert issubclass(kind, expected)
