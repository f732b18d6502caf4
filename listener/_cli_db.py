"""`amqp-listener db upgrade`: create or upgrade the framework's tables.

Also the one place the database commands (`db`, `jobs`, `workers`) turn the settings into an
engine and a database failure into one line and exit code 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer

from listener.errors import ConfigurationError
from listener.settings import get_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["DatabaseUrlOption", "db_app", "with_database"]

T = TypeVar("T")

db_app = typer.Typer(
    help="The framework's database: create or upgrade its tables.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Database URL; overrides AMQP_LISTENER_DATABASE_URL.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]

NO_DATABASE = (
    "no database is configured: set AMQP_LISTENER_DATABASE_URL (or --database-url) to "
    "postgresql://user@host/db or sqlite:///path/to/file.db, then run "
    "`amqp-listener db upgrade`"
)


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"amqp-listener: error: {message}", err=True)
    raise typer.Exit(code)


def with_database(url: str | None, work: Callable[[Engine], T]) -> T:
    """Run `work` with an engine for the configured database; failures become one line."""
    try:
        settings = get_settings().with_database_url(url)
        if settings.database_url is None:
            _fail(NO_DATABASE, 1)
        from sqlalchemy.exc import SQLAlchemyError

        from listener.database import create_engine, describe_error

        raw = settings.database_url.get_secret_value()
        engine = create_engine(raw)
    except ConfigurationError as exc:
        _fail(str(exc), 2)
    try:
        return work(engine)
    except SQLAlchemyError as exc:
        _fail(describe_error(exc, raw), 1)
    finally:
        engine.dispose()


@db_app.command()
def upgrade(database_url: DatabaseUrlOption = None, as_json: JsonOption = False) -> None:
    """Create the framework's tables, or bring them to the newest version. Safe to repeat,
    and to run from several hosts at once."""
    from listener import schema

    done = with_database(database_url, schema.upgrade)
    if as_json:
        applied = [
            {"component": step.component, "version": step.version, "description": step.description}
            for step in done.applied
        ]
        typer.echo(json.dumps({"applied": applied, "versions": done.versions}, indent=2))
        return
    for step in done.applied:
        typer.echo(f"applied {step.component} {step.version}: {step.description}")
    versions = ", ".join(f"{name} {version}" for name, version in sorted(done.versions.items()))
    typer.echo(f"up to date ({versions})")
