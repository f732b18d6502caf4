"""`amqp-listener schedules`: every schedule, its next and last tick, and who fires it."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from listener import registry
from listener import schedule as _schedule
from listener._cli_operate import JsonOption, UrlOption, _console, _emit_json, _fail, _operate
from listener.errors import ListenerError
from listener.listener import Listener
from listener.operations import Operator
from listener.scheduler import scheduled, state_queue
from listener.settings import get_settings

__all__ = ["schedule_rows", "schedules"]


def schedules(
    modules: Annotated[list[str], typer.Argument(help="Modules that define the listeners.")],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Every schedule: listener, expression, next and last tick (UTC), the process firing it."""
    sys.path.insert(0, os.getcwd())  # as `run` does: the application's modules by name
    try:
        listeners = scheduled(registry.discover(modules))
        zone = _schedule.time_zone(get_settings().schedule_timezone)
    except (ListenerError, ValueError) as exc:
        _fail(str(exc), 2)
    now = dt.datetime.now(dt.UTC)
    rows = _operate(url, lambda operator: schedule_rows(operator, listeners, zone, now))
    if as_json:
        _emit_json({"schedules": rows})
        return
    table = Table("listener", "schedule", "next tick (UTC)", "last tick (UTC)", "fired by")
    for row in rows:
        fired_by = "-"
        if row["host"]:
            fired_by = f"{row['host']} pid {row['pid']} (runner {row['runner_pid']})"
        table.add_row(
            row["listener"],
            row["expression"] + (f" ({row['timezone']})" if row["timezone"] != "UTC" else ""),
            row["next_tick"],
            row["last_tick"] or "never",
            fired_by,
        )
    _console().print(table)


def schedule_rows(
    operator: Operator, listeners: list[type[Listener]], zone: dt.tzinfo, now: dt.datetime
) -> list[dict[str, Any]]:
    """Each scheduled listener's expression, next tick, and last tick with who fired it (read
    from its state queue); what `schedules` prints, and the web console shows."""
    rows = []
    for cls in listeners:
        plan = _schedule.schedule_of(cls, zone)
        assert plan is not None
        state: dict[str, Any] = {}
        body = operator.peek_latest(state_queue(cls))
        if body is not None:
            try:
                state = json.loads(body)
            except ValueError:
                state = {}
        rows.append(
            {
                "listener": cls.name(),
                "expression": plan.expression,
                "timezone": str(zone) if plan.cron is not None else "UTC",
                "missed_ticks": cls.missed_ticks,
                "next_tick": plan.next_after(now).isoformat(),
                "last_tick": state.get("last_tick"),
                "host": state.get("host"),
                "pid": state.get("pid"),
                "runner_pid": state.get("runner_pid"),
            }
        )
    return rows
