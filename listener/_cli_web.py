"""`amqp-listener web`: the web console (needs the `[web]` extra)."""

from __future__ import annotations

from typing import Annotated

import typer

from listener import registry
from listener._cli_db import DatabaseUrlOption
from listener.errors import ListenerError
from listener.settings import get_settings

__all__ = ["web"]

TOKEN_VARIABLE = "AMQP_LISTENER_WEB_TOKEN"


def web(
    modules: Annotated[
        list[str] | None,
        typer.Argument(
            help="Modules that define the listeners; without them, the listener queues the "
            "management API shows."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback needs --auth or a token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8181,
    auth: Annotated[
        str | None,
        typer.Option(
            help="user:password for HTTP Basic. A bearer token can come from "
            f"{TOKEN_VARIABLE} instead.",
            show_default=False,
        ),
    ] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="No replay, no purge.")] = False,
    show_bodies: Annotated[
        bool, typer.Option("--show-bodies", help="Show parked messages' bodies.")
    ] = False,
    url: Annotated[
        str | None,
        typer.Option("--url", help="Broker URL; overrides AMQP_URL.", show_default=False),
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Serve the web console: listeners, parked messages with replay and purge, topology,
    schedules; with the job ledger, workers, jobs and the last hour's charts."""
    try:
        import uvicorn

        from listener._web_data import BrokerSource, job_source
        from listener._web_security import Credentials, bind_refusal
        from listener.web import Console, create_app
    except ImportError as exc:
        _fail(f"the web console needs its extra ({exc.name} is missing): "
              "pip install 'amqp-listener[web]'", 2)  # fmt: skip
    try:
        settings = get_settings().with_url(url).with_database_url(database_url)
        token = settings.web_token.get_secret_value() if settings.web_token else None
        credentials = Credentials.parse(auth, token)
    except (ListenerError, ValueError) as exc:
        _fail(str(exc), 2)
    refusal = bind_refusal(host, credentials)
    if refusal:
        _fail(refusal, 2)
    try:
        listeners = registry.discover(modules) if modules else None
    except ListenerError as exc:
        _fail(str(exc), 2)
    jobs = job_source(settings)
    console = Console(BrokerSource(settings, listeners), jobs, read_only, show_bodies)
    ledger = settings.redacted_database_url if jobs.available else "no job ledger"
    typer.echo(
        f"amqp-listener web console on http://{host}:{port}/ (broker {settings.redacted_url}, "
        f"{ledger}{', read-only' if read_only else ''})",
        err=True,
    )
    uvicorn.run(create_app(console, credentials), host=host, port=port, log_level="warning")


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"amqp-listener: error: {message}", err=True)
    raise typer.Exit(code)
