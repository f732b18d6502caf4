"""`amqp-listener delay list | replay`: delayed messages that came due after their
listener's queue was deleted, and sending them on once it exists again."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from listener import delay
from listener._cli_operate import JsonOption, UrlOption, _console, _emit_json, _operate

__all__ = ["delay_app"]

delay_app = typer.Typer(
    help=f"Delayed messages that found no listener when due (queue {delay.UNROUTED}).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@delay_app.command("list")
def delay_list(
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 100,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """The delayed messages whose listener's queue was gone when they came due: id, when
    they were due, and where they were going. Nothing is removed."""
    total, found = _operate(url, lambda operator: operator.unrouted(limit=limit))
    if as_json:
        _emit_json(
            {"queue": delay.UNROUTED, "total": total, "messages": [m.summary() for m in found]}
        )
        return
    table = Table("due at", "destination")
    table.add_column("id", no_wrap=True, min_width=32)
    for message in found:
        table.add_row(message.due_at, message.destination or "(no route)", message.message_id)
    console = _console()
    console.print(table)
    shown = f" (showing {len(found)})" if len(found) < total else ""
    console.print(f"{total} message(s) in {delay.UNROUTED}{shown}")


@delay_app.command("replay")
def delay_replay(
    limit: Annotated[int | None, typer.Option(min=1, help="Send at most this many.")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send them on to their listener's queue (or their address), now: declare the
    listener first (`amqp-listener declare MODULE`). Each leaves only after the broker
    confirmed its copy; one whose destination still does not exist stays. Exit 1 when any
    stayed."""
    result = _operate(url, lambda operator: operator.send_unrouted(limit=limit))
    if as_json:
        _emit_json(
            {
                "sent": [m.summary() for m in result.sent],
                "kept": [m.summary() for m in result.kept],
            }
        )
    else:
        typer.echo(f"sent {len(result.sent)} message(s) on")
        for message in result.sent:
            typer.echo(f"  {message.message_id} -> {message.destination}")
        if result.kept:
            typer.echo(
                f"kept {len(result.kept)} message(s): their destination does not exist; "
                "declare its listener (`amqp-listener declare MODULE`) and replay again"
            )
            for message in result.kept:
                typer.echo(f"  {message.message_id} -> {message.destination or '(no route)'}")
    if result.kept:
        raise typer.Exit(1)
