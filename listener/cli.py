"""The `amqp-listener` command: parses, formats and delegates; no broker logic lives here.

Exit codes: 0 done, 1 failed (broker or runtime), 2 usage or configuration error.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import sys
from typing import Annotated, Any, NoReturn

import typer
from pythonjsonlogger.json import JsonFormatter

from listener import registry
from listener._cli_db import DatabaseUrlOption, db_app
from listener._cli_delay import delay_app
from listener._cli_jobs import jobs_app, workers
from listener._cli_operate import JsonOption, dead_app, status
from listener._cli_outbox import relay, with_outbox
from listener._cli_schedules import schedules
from listener._cli_web import web
from listener.errors import BrokerError, ConfigurationError, ListenerError, PublishError
from listener.settings import Settings, get_settings

__all__ = ["app", "main"]

app = typer.Typer(
    name="amqp-listener",
    help="Reliable background work and event handling on RabbitMQ.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class LogLevel(enum.StrEnum):
    """How much the runner logs."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(enum.StrEnum):
    """How log lines are written."""

    TEXT = "text"
    JSON = "json"


UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Broker URL; overrides AMQP_URL. Prefer AMQP_URL: arguments are visible in ps.",
        show_default=False,
    ),
]
ModulesArgument = Annotated[
    list[str], typer.Argument(help="Modules that define the listeners, e.g. myapp.listeners.")
]


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"amqp-listener: error: {message}", err=True)
    raise typer.Exit(code)


def _settings(url: str | None) -> Settings:
    try:
        return get_settings().with_url(url)
    except ConfigurationError as exc:
        _fail(str(exc), 2)


def _configure_logging(level: str, log_format: str = "text") -> None:
    # Only the command configures logging; the library itself never touches the root logger.
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        # One JSON object per line; the outcome lines carry their fields (listener,
        # message_id, attempt, duration_ms, outcome, exception_type) as keys.
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The AMQP clients log each failed connect at ERROR, with tracebacks, in their own words;
    # the framework translates those failures into one line that says what to check.
    for name in ("aiormq", "aio_pika", "pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _listeners(modules: list[str], names: list[str] | None) -> list[Any]:
    sys.path.insert(0, os.getcwd())
    try:
        return registry.select(registry.discover(modules), names or [])
    except ListenerError as exc:
        _fail(str(exc), 2)


@app.command()
def run(
    modules: ModulesArgument,
    listener: Annotated[
        list[str] | None,
        typer.Option("--listener", "-l", help="Host only this listener (class name); repeatable."),
    ] = None,
    url: UrlOption = None,
    grace: Annotated[
        float | None,
        typer.Option(help="Seconds in-flight messages get after SIGTERM (default 25).", min=0),
    ] = None,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Exit at once if the broker is unreachable.")
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            "-w",
            min=1,
            help="Worker processes, under one supervisor that restarts any that die.",
        ),
    ] = 1,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="How much the runner logs.")
    ] = LogLevel.INFO,
    log_format: Annotated[
        LogFormat, typer.Option(case_sensitive=False, help="text for people, json for machines.")
    ] = LogFormat.TEXT,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help="Serve Prometheus metrics of all workers on this port, all interfaces "
            "(0: a free port, logged). Default: off.",
            show_default=False,
        ),
    ] = None,
    health_port: Annotated[
        int | None,
        typer.Option(
            "--health-port",
            min=0,
            max=65535,
            help="Serve /livez and /readyz (Kubernetes probes) on this port, all interfaces "
            "(0: a free port, logged). Default: off (or AMQP_LISTENER_HEALTH_PORT).",
            show_default=False,
        ),
    ] = None,
    outbox: Annotated[
        bool,
        typer.Option(
            "--outbox",
            help="Also run an outbox relay, a supervised process (needs "
            "AMQP_LISTENER_DATABASE_URL or --database-url).",
        ),
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Host the listeners in MODULES and consume until stopped (SIGTERM/SIGINT drain).

    SIGUSR2 pauses consuming, SIGCONT resumes it, SIGHUP reloads the code with a rolling
    restart of the workers.
    """
    from listener.runner import run as run_listeners

    _configure_logging(log_level.value, log_format.value)
    if database_url is not None:  # read by the workers' ledger, as the variable would be
        os.environ["AMQP_LISTENER_DATABASE_URL"] = database_url
        get_settings.cache_clear()
    settings = _settings(url)
    if grace is not None:
        settings = settings.model_copy(update={"grace_period": grace})
    if health_port is not None:
        settings = settings.model_copy(update={"health_port": health_port})
    settings = with_outbox(settings, outbox=outbox, database_url=database_url)
    endpoint = None
    if metrics_port is not None:
        from listener.metrics import MultiprocessEndpoint

        # Before the modules are imported: prometheus_client picks its multiprocess mode
        # when it is first imported (see listener.metrics).
        endpoint = MultiprocessEndpoint(metrics_port)
        try:
            endpoint.open()
        except ConfigurationError as exc:
            _fail(str(exc), 2)
    listeners = _listeners(modules, listener)
    from listener import _scheduler_process as scheduler  # listeners with a schedule: its process

    ticking = scheduler.start(
        modules, listener, listeners, settings, log_level.value, log_format.value
    )
    try:
        code = run_listeners(
            listeners, settings, workers=workers, fail_fast=fail_fast, metrics=endpoint
        )
    except BrokerError as exc:
        _fail(str(exc), 1)
    except ConfigurationError as exc:
        _fail(str(exc), 2)
    finally:
        scheduler.stop(ticking)
    raise typer.Exit(code)


@app.command()
def declare(modules: ModulesArgument, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Declare the exchanges and queues of the listeners in MODULES, then exit."""
    from listener.runner.amqp_transport import Transport

    _configure_logging("WARNING")
    settings = _settings(url)
    listeners = _listeners(modules, None)

    async def declare_all() -> None:
        transport = await Transport.connect(settings, name="amqp-listener declare")
        try:
            for cls in listeners:
                await transport.declare(cls.topology(settings))
        finally:
            await transport.close()

    try:
        asyncio.run(declare_all())
    except BrokerError as exc:
        _fail(str(exc), 1)
    declared = []
    for cls in listeners:
        topology = cls.topology(settings)
        declared.append(
            {
                "listener": cls.name(),
                "exchange": topology.exchange,
                "binding_key": topology.binding_key,
                "queues": [spec.name for spec in topology.queues],
            }
        )
    levels = [spec.name for spec in listeners[0].topology(settings).levels] if listeners else []
    if as_json:
        typer.echo(json.dumps({"declared": declared, "delay_levels": levels}, indent=2))
        return
    for item in declared:
        typer.echo(
            f"{item['listener']}: exchange {item['exchange']!r} -> {', '.join(item['queues'])}"
        )
    if levels:
        typer.echo(f"shared by all: {levels[0]} .. {levels[-2]} (delay levels), {levels[-1]}")


@app.command()
def publish(
    address: Annotated[str, typer.Argument(help="exchange.routing_key")],
    body: Annotated[str, typer.Argument(help="The message, as JSON.")],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish one JSON message by hand and wait for the broker's confirm."""
    from listener.publisher import Publisher

    _configure_logging("WARNING")
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        _fail(f"the message is not valid JSON ({exc.msg} at position {exc.pos})", 2)
    publisher = Publisher(_settings(url))
    try:
        message_id = publisher.publish(address, value)
    except ValueError as exc:
        _fail(str(exc), 2)
    except (PublishError, BrokerError, ConfigurationError) as exc:
        _fail(str(exc), 1)
    finally:
        publisher.close()
    typer.echo(
        json.dumps({"message_id": message_id, "address": address}) if as_json else message_id
    )


app.command()(status)
app.command()(schedules)
app.add_typer(dead_app, name="dead")
app.add_typer(db_app, name="db")
app.add_typer(delay_app, name="delay")
app.add_typer(jobs_app, name="jobs")
app.command()(workers)
app.command()(relay)
app.command()(web)


def main() -> None:
    """Console-script entry point."""
    # Modules named on the command line are looked up from the current directory first,
    # as `python -m` does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    app()
