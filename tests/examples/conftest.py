"""Fixtures for the examples' tests.

The examples are a package at the repository root, run from there as
`python -m examples.<name>.demo`; this directory has no `__init__.py` (an `examples` package
here would shadow them), so the root is put on `sys.path` for the imports below.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from listener.settings import get_settings  # noqa: E402


@pytest.fixture
def run_demo(amqp_url: str) -> Callable[[str], subprocess.CompletedProcess[str]]:
    """`run_demo("examples.x.demo")` runs that demo against the test broker, as CI does
    (`url=` points it at another)."""

    def run(module: str, url: str = amqp_url) -> subprocess.CompletedProcess[str]:
        environment = {**os.environ, "AMQP_URL": url, "PYTHONPATH": str(ROOT)}
        environment.pop("AMQP_LISTENER_QUEUE_PREFIX", None)
        return subprocess.run(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=100,
        )

    return run


@pytest.fixture
def publish_to(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """`publish_to(url, **settings)` points this process's notify()/anotify() at `url`.

    The process-wide settings are read once and cached: the cache is cleared now and again
    after the test, which then sees the environment it had before.
    """

    def point(url: str, **settings: str) -> None:
        monkeypatch.setenv("AMQP_URL", url)
        for name, value in settings.items():
            monkeypatch.setenv(f"AMQP_LISTENER_{name.upper()}", value)
        get_settings.cache_clear()

    yield point
    monkeypatch.undo()
    get_settings.cache_clear()
