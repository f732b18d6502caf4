"""Which Listener classes exist, and finding the ones a `run MODULE` command should host."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from listener.errors import ConfigurationError, ListenerDefinitionError

if TYPE_CHECKING:
    from listener.listener import Listener

__all__ = ["all_listeners", "clear", "discover", "import_module", "register", "select"]

_registry: list[type[Listener]] = []


def register(cls: type[Listener]) -> None:
    """Record a concrete Listener class (called from `Listener.__init_subclass__`)."""
    _registry.append(cls)


def all_listeners() -> list[type[Listener]]:
    """Every concrete Listener class defined so far, in definition order."""
    return list(_registry)


def clear() -> None:
    """Forget every registered class (for tests that define listeners on the fly)."""
    _registry.clear()


def import_module(path: str) -> object:
    """Import `path` (dotted module name), or raise ConfigurationError saying why not."""
    if "/" in path or path.endswith(".py"):
        raise ConfigurationError(
            f"{path!r} looks like a file path; give a module name like 'myapp.listeners' "
            "(and run from the directory that holds 'myapp', or add it to PYTHONPATH)"
        )
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name and (path == exc.name or path.startswith(exc.name + ".")):
            raise ConfigurationError(
                f"cannot import module {path!r}: no module named {exc.name!r} "
                "(check the spelling, the current directory and PYTHONPATH)"
            ) from None
        raise ConfigurationError(
            f"importing module {path!r} failed: it imports {exc.name!r}, which is not installed"
        ) from exc
    except ListenerDefinitionError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"importing module {path!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def discover(modules: Sequence[str]) -> list[type[Listener]]:
    """Import `modules` and return the Listener classes defined in them (or their
    submodules) or imported into them, each once, in definition order."""
    from listener.listener import Listener

    found: dict[type[Listener], None] = {}
    for path in modules:
        module = import_module(path)
        prefix = path + "."
        for cls in _registry:
            if cls.__module__ == path or cls.__module__.startswith(prefix):
                found[cls] = None
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Listener) and not value.__abstract__:
                found[value] = None
    ordered = sorted(found, key=_registry.index)
    if not ordered:
        raise ConfigurationError(
            f"no Listener subclasses found in {', '.join(modules)}: define a class with "
            "subscribes_to and handle() there, or import it into that module"
        )
    _check_unique_queues(ordered)
    return ordered


def select(listeners: Iterable[type[Listener]], names: Sequence[str]) -> list[type[Listener]]:
    """Keep the listeners named in `names` (class name or `module:ClassName`)."""
    listeners = list(listeners)
    if not names:
        return listeners
    chosen: list[type[Listener]] = []
    for name in names:
        matches = [cls for cls in listeners if name in (cls.__name__, cls.__qualname__, cls.name())]
        if not matches:
            known = ", ".join(cls.__name__ for cls in listeners)
            raise ConfigurationError(f"no listener named {name!r}; the modules define: {known}")
        if len(matches) > 1:
            raise ConfigurationError(
                f"{name!r} names several listeners; use module:ClassName "
                f"({', '.join(cls.name() for cls in matches)})"
            )
        chosen.extend(cls for cls in matches if cls not in chosen)
    return chosen


def _check_unique_queues(listeners: Sequence[type[Listener]]) -> None:
    owners: dict[str, type[Listener]] = {}
    for cls in listeners:
        other = owners.setdefault(cls.queue, cls)
        if other is not cls:
            raise ConfigurationError(
                f"{other.name()} and {cls.name()} both use queue {cls.queue!r}: each listener "
                "owns its queue; set queue = '...' on one of them"
            )
