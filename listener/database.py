"""The framework's database: what `AMQP_LISTENER_DATABASE_URL` names, and engines for it.

PostgreSQL is the production store, reached with psycopg 3; SQLite is the embedded store for
one host. The URL forms users write are accepted as they are:

    postgresql://user@host/db            psycopg 3 (not psycopg2, whatever is installed)
    postgresql+psycopg://user@host/db    the same
    sqlite:///relative/path.db           a file beside the working directory
    sqlite:////absolute/path.db          an absolute path

Everything here needs the `db` extra: `pip install 'amqp-listener[db]'`.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from listener.errors import ConfigurationError
from listener.settings import redact_url

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "async_url",
    "create_async_engine",
    "create_engine",
    "describe_error",
    "normalize_url",
    "redact_database_url",
]

_SYNC_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite",
}
_ASYNC_DRIVERS = {"postgresql+psycopg": "postgresql+psycopg", "sqlite": "sqlite+aiosqlite"}
#: Seconds a SQLite writer waits for another one before giving up with "database is locked".
_SQLITE_BUSY_SECONDS = 30.0


def normalize_url(url: str) -> URL:
    """The SQLAlchemy URL for `url`, with the driver the framework uses for it.

    Raises:
        ConfigurationError: the URL cannot be parsed, or names a database the framework
            does not support (the text never quotes the password).
    """
    _require_sqlalchemy()
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigurationError(
            "the database URL cannot be parsed; expected postgresql://user@host/db or "
            "sqlite:///path/to/file.db"
        ) from None
    driver = _SYNC_DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ConfigurationError(
            f"the database URL names {parsed.drivername!r}: use postgresql:// (psycopg 3) or "
            "sqlite:///path/to/file.db"
        )
    if driver == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "the database URL names an in-memory SQLite database, which every process would "
            "see empty: give a file, sqlite:///path/to/file.db"
        )
    return parsed.set(drivername=driver)


def async_url(url: str) -> URL:
    """The SQLAlchemy URL for `url` with an asyncio driver (psycopg 3, or aiosqlite)."""
    parsed = normalize_url(url)
    return parsed.set(drivername=_ASYNC_DRIVERS[parsed.drivername])


def redact_database_url(url: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`, for messages."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        return "<unparseable database URL>"
    if scheme.startswith("sqlite"):
        return url
    return redact_url(url)


def create_engine(url: str, **options: Any) -> Engine:
    """A synchronous engine for `url`, set up the way the framework needs it.

    On SQLite: WAL journal (readers never wait for the writer), a busy timeout instead of an
    immediate "database is locked", and real transactions around DDL too (the sqlite3
    module's default commits before a CREATE TABLE, which would break a versioned upgrade).
    A connection opened with `execution_options(sqlite_begin="IMMEDIATE")` takes the write
    lock when its transaction begins.
    """
    import sqlalchemy

    parsed = normalize_url(url)
    if parsed.drivername != "sqlite":
        options.setdefault("pool_pre_ping", True)
        return sqlalchemy.create_engine(parsed, **options)
    connect_args = options.pop("connect_args", {})
    connect_args.setdefault("timeout", _SQLITE_BUSY_SECONDS)
    connect_args.setdefault("check_same_thread", False)
    engine = sqlalchemy.create_engine(parsed, connect_args=connect_args, **options)
    _sqlite_transactions(engine)
    return engine


def create_async_engine(url: str, **options: Any) -> AsyncEngine:
    """An asyncio engine for `url` (psycopg 3 on PostgreSQL, aiosqlite on SQLite)."""
    from sqlalchemy.ext.asyncio import create_async_engine as make

    parsed = async_url(url)
    if parsed.drivername == "sqlite+aiosqlite":
        options.setdefault("connect_args", {}).setdefault("timeout", _SQLITE_BUSY_SECONDS)
        engine = make(parsed, **options)
        _sqlite_transactions(engine.sync_engine)
        return engine
    options.setdefault("pool_pre_ping", True)
    return make(parsed, **options)


def describe_error(exc: BaseException, url: str) -> str:
    """One line for a database failure: what failed, where, and what to check.

    Only the driver's own first line is quoted: SQLAlchemy's text would add the statement and
    its parameters, which may hold values, and the password never appears.
    """
    where = redact_database_url(url)
    original = getattr(exc, "orig", None) or exc
    detail = str(original).strip().splitlines()[0] if str(original).strip() else ""
    password = _password(url)
    if password:
        detail = detail.replace(password, "***")
    kind = type(original).__name__
    # Before the unreachable case: SQLite reports a missing table as an OperationalError.
    if kind in {"UndefinedTable"} or "no such table" in detail:
        return (
            f"the database at {where} has no ledger tables ({detail}); run "
            "`amqp-listener db upgrade`"
        )
    if kind in {"OperationalError", "InterfaceError"}:
        return (
            f"the database at {where} is unreachable or refused ({detail}); check that it "
            "runs and that AMQP_LISTENER_DATABASE_URL is right"
        )
    return f"the database at {where} failed: {kind}: {detail}"


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _sqlite_transactions(engine: Engine) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Leave transaction control to SQLAlchemy's BEGIN below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # Turning a new database to WAL takes an exclusive lock and SQLite does not wait for
        # it (no busy timeout): processes that open a fresh file at once take turns here.
        # Once the file is in WAL mode, the statement takes no lock.
        for turn in range(100):
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or turn == 99:
                    raise
                time.sleep(0.05)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "")
        connection.exec_driver_sql(f"BEGIN {mode}".strip())


def _require_sqlalchemy() -> None:
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "the database features need the db extra: pip install 'amqp-listener[db]'"
        ) from None
