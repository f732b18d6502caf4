"""The package's public names: everything a user writes is importable from `listener`."""

from __future__ import annotations

import importlib
import inspect

import pytest

import listener
import listener.errors

REQUIRED = ["Listener", "publish", "apublish", "Publisher", "AsyncPublisher", "Settings"]


def _public_definitions(module) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == module.__name__
    )


def test_all_is_sorted():
    assert listener.__all__ == sorted(listener.__all__)


def test_all_has_no_duplicates():
    assert len(listener.__all__) == len(set(listener.__all__))


@pytest.mark.parametrize("name", listener.__all__)
def test_every_exported_name_is_importable(name):
    module = importlib.import_module("listener")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from listener import {name}", namespace)
    assert namespace[name] is getattr(listener, name)


def test_every_public_error_is_exported():
    defined = _public_definitions(listener.errors)
    assert "ListenerError" in defined
    assert "Retry" in defined
    missing = sorted(set(defined) - set(listener.__all__))
    assert missing == []


def test_the_errors_module_lists_every_error_it_defines():
    assert sorted(listener.errors.__all__) == _public_definitions(listener.errors)


@pytest.mark.parametrize("name", REQUIRED)
def test_the_main_entry_points_are_exported(name):
    assert name in listener.__all__
    assert hasattr(listener, name)


def test_every_error_but_the_handler_signals_derives_from_listener_error():
    for name in listener.errors.__all__:
        cls = getattr(listener.errors, name)
        if name in ("Retry", "Reject"):
            assert not issubclass(cls, listener.ListenerError)
        else:
            assert issubclass(cls, listener.ListenerError), name


def test_the_version_is_exported():
    assert "__version__" in listener.__all__
    assert isinstance(listener.__version__, str)
