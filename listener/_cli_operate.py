"""The operator's commands: `status` and `dead list | show | replay | purge`.

Each prints a table for people, or one JSON document on stdout with `--json`. Exit codes:
0 done, 1 failed, 2 usage error (an unknown target included).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from listener import delay as _delay
from listener import registry
from listener._cli_db import DatabaseUrlOption
from listener._cli_outbox import describe_lag, outbox_lag
from listener.errors import BrokerError, ConfigurationError, ListenerError, PublishError
from listener.operations import Operator, Page, Target
from listener.settings import Settings, get_settings

__all__ = ["dead_app", "status"]

T = TypeVar("T")

dead_app = typer.Typer(
    help="Parked messages: list, show, replay, purge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

UrlOption = Annotated[
    str | None, typer.Option("--url", help="Broker URL; overrides AMQP_URL.", show_default=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
TargetArgument = Annotated[
    str, typer.Argument(help="A listener (module:ClassName) or its queue name.")
]
IdsOption = Annotated[
    list[str] | None, typer.Option("--id", help="A parked message's id; repeatable.")
]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"amqp-listener: error: {message}", err=True)
    raise typer.Exit(code)


def _operate(url: str | None, work: Callable[[Operator], T]) -> T:
    """Run `work` with an Operator, its errors (the Operator raises only amqp-listener's
    own) as one line and an exit code."""
    try:
        settings: Settings = get_settings().with_url(url)
        with Operator(settings) as operator:
            return work(operator)
    except ConfigurationError as exc:
        _fail(str(exc), 2)
    except (BrokerError, PublishError) as exc:
        _report_partial(exc)
        _fail(str(exc), 1)
    except ListenerError as exc:
        _fail(str(exc), 2)


def _report_partial(exc: BaseException) -> None:
    """Before an error line: the ids a replay had already moved (and removed)."""
    partial = getattr(exc, "partial_result", None)
    if partial is not None and partial.done:
        typer.echo(f"replayed {len(partial.done)} message(s) before the error:")
        for message_id in partial.done:
            typer.echo(f"  {message_id}")


def _emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def _console() -> Console:
    # Piped into a file or a pager, rich would assume 80 columns and cut the message ids.
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def status(
    modules: Annotated[
        list[str] | None,
        typer.Argument(
            help="Modules that define the listeners; without them, the listener queues the "
            "management API shows."
        ),
    ] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Every listener with its queue: ready, unacked, consumers, waiting for a retry,
    parked; the messages delayed (not yet due) in the delay levels all listeners share; with
    a database, the outbox lag (rows waiting, age of the oldest)."""
    listeners = None
    if modules:
        try:
            listeners = registry.discover(modules)
        except ListenerError as exc:
            _fail(str(exc), 2)
    rows, delays = _operate(
        url, lambda operator: (operator.status(listeners), operator.delay_status())
    )
    settings = get_settings().with_database_url(database_url)
    outbox = outbox_lag(settings)
    delayed = _ledger_delayed(settings)
    if as_json:
        _emit_json(
            {
                **({"outbox": outbox} if outbox is not None else {}),
                "delay_levels": {
                    "declared": delays.declared,
                    "delayed": delays.delayed,
                    "unrouted": delays.unrouted,
                },
                "listeners": [
                    {
                        "listener": row.listener,
                        "queue": row.queue,
                        "declared": not row.missing,
                        "ready": row.ready,
                        "unacked": row.unacked,
                        "consumers": row.consumers,
                        "waiting_retry": row.waiting_retry,
                        "delayed": None if delayed is None else delayed.get(row.queue, 0),
                        "parked": row.parked,
                        "publish_rate": row.publish_rate,
                        "ack_rate": row.ack_rate,
                        "source": row.source,
                    }
                    for row in rows
                ],
            }
        )
        return
    columns = ["listener", "queue", "ready", "unacked", "consumers", "waiting retry", "parked"]
    if delayed is not None:
        columns.insert(-1, "delayed")
    table = Table(*columns)
    for row in rows:
        if row.missing:
            table.add_row(row.listener, row.queue, "not declared", *["-"] * (len(columns) - 3))
            continue
        cells = [
            row.listener,
            row.queue,
            str(row.ready),
            "-" if row.unacked is None else str(row.unacked),
            str(row.consumers),
            str(row.waiting_retry),
            str(row.parked if row.parked is not None else "-"),
        ]
        if delayed is not None:
            cells.insert(-1, str(delayed.get(row.queue, 0)))
        table.add_row(*cells)
    console = _console()
    console.print(table)
    if delays.declared:
        console.print(
            f"delayed (not yet due, all listeners): {delays.delayed}"
            + (
                f"; {delays.unrouted} came due after their listener's queue was deleted "
                f"(queue {_delay.UNROUTED}; `amqp-listener delay list` shows them, "
                "`amqp-listener delay replay` sends them on)"
                if delays.unrouted
                else ""
            )
        )
    if outbox is not None:
        console.print(describe_lag(outbox))
    if rows and all(row.source == "amqp" for row in rows):
        console.print(
            "unacked counts need the management plugin's API (rabbitmq-plugins enable "
            "rabbitmq_management, or set AMQP_LISTENER_MANAGEMENT_URL)"
        )


def _ledger_delayed(settings: Settings) -> dict[str, int] | None:
    """Each listener's delayed messages as the ledger knows them (the broker cannot tell
    them apart in the shared levels); None without a database, or when it does not answer
    (the totals from the broker still show)."""
    if settings.database_url is None:
        return None
    from sqlalchemy.exc import SQLAlchemyError

    from listener import database, jobs

    engine = database.create_engine(settings.database_url.get_secret_value())
    try:
        return jobs.delayed(engine=engine)
    except SQLAlchemyError:
        return None
    finally:
        engine.dispose()


@dead_app.command("list")
def dead_list(
    target: TargetArgument,
    ids: IdsOption = None,
    exception: Annotated[
        str | None, typer.Option(help="Only messages whose exception type contains this.")
    ] = None,
    older_than: Annotated[
        str | None, typer.Option(help="Only messages parked longer ago than this (30m, 2h, 7d).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many (one page).")] = 100,
    after: Annotated[
        str | None,
        typer.Option(
            "--after", metavar="ID", help="Start after this message (the last of a page)."
        ),
    ] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """The parked messages, oldest first, a page at a time: id, when, attempts, reason,
    exception."""
    age = _duration(older_than) if older_than else None

    def work(operator: Operator) -> tuple[Target, Page]:
        target_ = operator.target(target)
        page = operator.page(
            target_, limit=limit, after=after, ids=ids or (), exception=exception, older_than=age
        )
        return target_, page

    resolved, page = _operate(url, work)
    if as_json:
        _emit_json(
            {
                "queue": resolved.dead_queue,
                "total": page.total,
                "messages": [p.summary() for p in page.messages],
                "next_after": page.next_after,
            }
        )
        return
    table = Table("parked at", "attempts", "reason", "exception", "message")
    table.add_column("id", no_wrap=True, min_width=32)
    for p in page.messages:
        table.add_row(
            p.parked_at,
            "-" if p.attempts is None else str(p.attempts),
            p.reason,
            p.exception_type,
            _one_line(p.exception_message, 60),
            p.message_id,
        )
    console = _console()
    console.print(table)
    shown = f" (showing {len(page.messages)})" if len(page.messages) < page.total else ""
    console.print(f"{page.total} parked message(s) in {resolved.dead_queue}{shown}")
    if page.next_after:
        console.print(f"next page: --after {page.next_after}", markup=False, highlight=False)


@dead_app.command("show")
def dead_show(
    target: TargetArgument,
    message_id: Annotated[str, typer.Argument(metavar="ID", help="The parked message's id.")],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """One parked message, whole: properties, headers (the failure record) and body."""
    parked = _operate(url, lambda operator: operator.find(operator.target(target), message_id))
    if parked is None:
        _fail(f"no parked message with id {message_id!r} in {target}", 1)
    body, encoding = _body(parked.body)
    if as_json:
        _emit_json(
            {
                **parked.summary(),
                "listener": parked.listener,
                "host": parked.host,
                "pid": parked.pid,
                "first_failure_at": parked.first_failure_at,
                "peeks": parked.peeks,
                "replays": parked.replays,
                "properties": parked.properties,
                "headers": parked.headers,
                "body": body,
                "body_encoding": encoding,
            }
        )
        return
    console = _console()
    console.print(f"[bold]message {parked.message_id}[/bold]  ({parked.reason})")
    for key, value in parked.properties.items():
        console.print(f"  {key}: {value}", markup=False, highlight=False)
    console.print("[bold]headers[/bold]")
    for key, value in sorted(parked.headers.items()):
        if key == "x-exception-traceback":
            continue
        console.print(f"  {key}: {value}", markup=False, highlight=False)
    traceback = parked.headers.get("x-exception-traceback")
    if traceback:
        console.print("[bold]traceback[/bold]")
        console.print(str(traceback), markup=False, highlight=False)
    console.print(f"[bold]body[/bold] ({len(parked.body)} bytes, {encoding})")
    console.print(body, markup=False, highlight=False)


@dead_app.command("replay")
def dead_replay(
    target: TargetArgument,
    ids: IdsOption = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Replay at most this many.")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send parked messages back to their listener's queue with a fresh attempt count.

    A message leaves the dead-letter queue only after the broker confirmed its replay.
    """
    result = _operate(
        url, lambda operator: operator.replay(operator.target(target), ids=ids or (), limit=limit)
    )
    _report("replayed", result.done, result.not_found, as_json)


@dead_app.command("purge")
def dead_purge(
    target: TargetArgument,
    ids: IdsOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask first.")] = False,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete parked messages (those given with --id, or all), asking first unless --yes."""
    if not yes:
        what = f"{len(ids)} parked message(s)" if ids else "ALL parked messages"
        if not sys.stdin.isatty():
            _fail(f"refusing to delete {what} of {target} without --yes (no terminal to ask)", 2)
        if not typer.confirm(f"Delete {what} of {target}? This cannot be undone"):
            _fail("nothing deleted", 1)
    result = _operate(url, lambda operator: operator.purge(operator.target(target), ids=ids or ()))
    _report("purged", result.done, result.not_found, as_json)


def _report(verb: str, done: Sequence[str], not_found: Sequence[str], as_json: bool) -> None:
    if as_json:
        _emit_json({verb: list(done), "not_found": list(not_found)})
    else:
        typer.echo(f"{verb} {len(done)} message(s)")
        for message_id in done:
            typer.echo(f"  {message_id}")
        for message_id in not_found:
            typer.echo(f"amqp-listener: error: no parked message with id {message_id!r}", err=True)
    if not_found:
        raise typer.Exit(1)


def _duration(text: str) -> dt.timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        _fail(f"{text!r} is not a duration like 30s, 15m, 2h or 7d", 2)
    return dt.timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _body(body: bytes) -> tuple[str, str]:
    try:
        return body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(body).decode(), "base64"


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
