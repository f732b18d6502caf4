"""`amqp-listener relay`: publish what the outbox holds, alone, with no application code.

The relay reads the broker URL (`AMQP_URL`, `--url`) and the database URL
(`AMQP_LISTENER_DATABASE_URL`, `--database-url`): each row carries its own exchange and
routing key. SIGTERM or SIGINT stops it once its current batch is settled.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated, Any, NoReturn

import typer

from listener._cli_db import NO_DATABASE, DatabaseUrlOption
from listener.errors import ConfigurationError
from listener.settings import Settings, get_settings

__all__ = ["describe_lag", "outbox_lag", "relay", "serve_relay", "with_outbox"]

UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="Broker URL; overrides AMQP_URL.", show_default=False),
]


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"amqp-listener: error: {message}", err=True)
    raise typer.Exit(code)


def relay(
    url: UrlOption = None,
    database_url: DatabaseUrlOption = None,
    log_level: Annotated[
        str, typer.Option(help="How much the relay logs: DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
) -> None:
    """Publish the outbox's committed messages with confirms until SIGTERM/SIGINT.

    Several relays may run at once. A broker or database outage only delays the messages.
    """
    from listener.cli import _configure_logging

    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        _fail(f"--log-level must be DEBUG, INFO, WARNING or ERROR, not {log_level!r}", 2)
    _configure_logging(log_level)
    try:
        settings = get_settings().with_url(url).with_database_url(database_url)
        if settings.database_url is None:
            _fail(NO_DATABASE, 2)
        code = serve_relay(settings)
    except ConfigurationError as exc:
        _fail(str(exc), 2)
    raise typer.Exit(code)


def with_outbox(settings: Settings, *, outbox: bool, database_url: str | None) -> Settings:
    """`run`'s settings with `--outbox` and `--database-url` applied; exits 2 when the relay
    is asked for and no database is configured."""
    settings = settings.with_database_url(database_url)
    if outbox:
        settings = settings.model_copy(update={"outbox_relay": True})
    if settings.outbox_relay and settings.database_url is None:
        _fail(f"--outbox: {NO_DATABASE}", 2)
    return settings


def serve_relay(settings: Settings) -> int:
    """Run a relay in this process until SIGTERM or SIGINT; the exit code. It runs on the
    loop `event_loop` chooses (uvloop when installed), as the workers and `notify_many()` do.

    Raises:
        ConfigurationError: no database URL, or its outbox table is missing.
    """
    from listener import _loop
    from listener.relay import Relay

    worker = Relay(settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stop)
        await worker.run()

    _loop.run(main(), settings)
    return 0


def outbox_lag(settings: Settings) -> dict[str, Any] | None:
    """`status`'s outbox entry: rows waiting and the oldest one's age, or None without a
    database (or before `db upgrade` created the outbox)."""
    if settings.database_url is None:
        return None
    from sqlalchemy.exc import SQLAlchemyError

    from listener import database
    from listener.outbox import lag

    raw = settings.database_url.get_secret_value()

    async def read() -> dict[str, Any] | None:
        engine = database.create_async_engine(raw)
        try:
            return await lag(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(read())
    except SQLAlchemyError as exc:
        return {"error": database.describe_error(exc, raw)}


def describe_lag(lag: dict[str, Any]) -> str:
    """`status`'s line for the outbox lag."""
    if "error" in lag:
        return f"outbox: unknown ({lag['error']})"
    age = lag["oldest_age_seconds"]
    oldest = "" if age is None else f", the oldest {age:.1f}s old"
    return f"outbox: {lag['rows_waiting']} row(s) waiting to be published{oldest}"
