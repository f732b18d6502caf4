"""The ledger's commands: `jobs show ID`, `jobs list [TARGET]`, `workers`.

Each prints a table for people, or one JSON document on stdout with `--json`. Exit codes:
0 done, 1 failed (no database, an unreachable one, an unknown id), 2 usage error.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from listener._cli_db import DatabaseUrlOption, JsonOption, with_database

if TYPE_CHECKING:
    from listener.jobs import Attempt, Gap, Job, WorkerStatus

__all__ = ["jobs_app", "workers"]

jobs_app = typer.Typer(
    help="The job ledger: did it run, did it fail, how, where.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_STATES = ("pending", "running", "retrying", "handled", "parked")


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"amqp-listener: error: {message}", err=True)
    raise typer.Exit(code)


@jobs_app.command("show")
def show(
    message_id: Annotated[str, typer.Argument(metavar="ID", help="The message id.")],
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """The story of one message: its publish and every attempt, with where, when, how long
    and how it ended, and where the message is now."""
    from listener import jobs

    found, gaps = with_database(database_url, lambda engine: jobs.story(message_id, engine=engine))
    if as_json:
        _emit(
            {
                "message_id": message_id,
                "jobs": [_job_json(job) for job in found],
                "gaps": [_gap_json(gap) for gap in gaps],
            }
        )
        if not found:
            more = " (records were dropped in its gaps: it may have run then)" if gaps else ""
            _fail(f"no record of message {message_id} in the ledger{more}", 1)
        return
    if not found:
        for gap in gaps:
            typer.echo(_gap_line(gap), err=True)
        more = " (records were dropped in the gaps above: it may have run then)" if gaps else ""
        _fail(f"no record of message {message_id} in the ledger{more}", 1)
    console = _console()
    for job in found:
        tags = f"   tags: {', '.join(job.tags)}" if job.tags else ""
        console.print(f"message {job.message_id}   listener {job.listener}{tags}")
        console.print(f"state: {job.state}   now: {job.where}")
        table = Table("#", "outcome", "host", "pid", "started (UTC)", "took", "then", "error")
        for attempt in job.attempts:
            table.add_row(*_attempt_cells(attempt))
        console.print(table)
    for gap in gaps:
        console.print(_gap_line(gap))


@jobs_app.command("list")
def list_jobs(
    target: Annotated[
        str | None,
        typer.Argument(help="A listener (module:ClassName) or its queue name; default: all."),
    ] = None,
    tag: Annotated[str | None, typer.Option(help="Only jobs tagged so (Account:121).")] = None,
    state: Annotated[
        str | None, typer.Option(help=f"Only jobs in this state: {', '.join(_STATES)}.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only jobs with a record this recent (30m, 1h, 7d).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show the N most recent jobs.")] = 50,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Jobs by listener, tag, state and time: the most recent ones, oldest first."""
    from listener import jobs

    if state is not None and state not in _STATES:
        raise typer.BadParameter(f"use one of {', '.join(_STATES)}", param_hint="--state")
    moment = dt.datetime.now(dt.UTC) - _duration(since) if since else None

    def work(engine: Any) -> tuple[list[Job], list[Gap]]:
        listener = _resolve(engine, target) if target else None
        found = jobs.find(
            listener=listener, tag=tag, state=state, since=moment, limit=limit, engine=engine
        )
        first = min((job.attempts[0].started_at for job in found), default=None)
        window = moment or first or dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
        return found, jobs.gaps_since(window, engine=engine)

    found, gaps = with_database(database_url, work)
    if as_json:
        _emit({"jobs": [_job_json(job) for job in found], "gaps": [_gap_json(g) for g in gaps]})
        return
    table = Table("message id", "listener", "state", "attempts", "updated (UTC)", "now", "error")
    for job in found:
        last = job.attempts[-1]
        error = f"{last.exception_type}: {last.exception_message}" if last.exception_type else ""
        table.add_row(
            job.message_id,
            job.listener,
            job.state,
            str(max(attempt.attempt for attempt in job.attempts)),
            _time(job.updated_at),
            job.where,
            error,
        )
    console = _console()
    console.print(table)
    console.print(f"{len(found)} job(s)")
    for gap in gaps:
        console.print(_gap_line(gap))


def workers(database_url: DatabaseUrlOption = None, as_json: JsonOption = False) -> None:
    """Every worker on every host: what it serves, what it runs now and since when."""
    from listener import jobs

    found = with_database(database_url, lambda engine: jobs.workers(engine=engine))
    live = [worker for worker in found if not worker.lost]
    busy = sum(1 for worker in live if worker.busy)
    if as_json:
        _emit(
            {
                "busy": busy,
                "total": len(live),
                "workers": [_worker_json(worker) for worker in found],
            }
        )
        return
    console = _console()
    console.print(f"{busy} of {len(live)} workers busy")
    table = Table(
        "host",
        "pid",
        "state",
        "listeners",
        "running (message id, listener, since UTC)",
        "handled",
        "retried",
        "parked",
    )
    for worker in found:
        state = "lost" if worker.lost else "busy" if worker.busy else "idle"
        running = "\n".join(
            f"{item.message_id} {item.listener} {_time(item.since)}" for item in worker.running
        )
        if worker.lost:
            running = f"silent since {_time(worker.seen_at)}"
        table.add_row(
            worker.host,
            str(worker.pid),
            state,
            "\n".join(worker.listeners),
            running,
            str(worker.handled),
            str(worker.retried),
            str(worker.parked),
        )
    console.print(table)


# -- helpers ---------------------------------------------------------------------------------


def _resolve(engine: Any, target: str) -> str:
    """A listener name as the ledger stores it, from `module:Class` or a queue name."""
    from sqlalchemy import select

    from listener.ledger import attempts

    column = attempts.c.listener if ":" in target else attempts.c.queue
    with engine.connect() as connection:
        names = (
            connection.execute(
                select(attempts.c.listener).where(column == target).distinct().limit(2)
            )
            .scalars()
            .all()
        )
    if not names:
        _fail(
            f"no job of {target!r} in the ledger: name a listener (module:ClassName) or its "
            "queue, as `amqp-listener status` shows them",
            2,
        )
    if len(names) > 1:
        _fail(f"queue {target!r} has several listeners: name one (module:ClassName)", 2)
    return str(names[0])


def _attempt_cells(attempt: Attempt) -> list[str]:
    outcome = "published" if attempt.attempt == 0 else attempt.outcome
    took = "" if attempt.duration is None else _took(attempt.duration)
    error = ""
    if attempt.exception_type:
        error = f"{attempt.exception_type}: {attempt.exception_message or ''}"
    return [
        str(attempt.attempt),
        outcome,
        attempt.host,
        str(attempt.pid),
        _time(attempt.started_at),
        took,
        attempt.next_queue or "",
        error,
    ]


def _took(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _gap_line(gap: Gap) -> str:
    return (
        f"gap: {gap.dropped} record(s) dropped between {_time(gap.started_at)} and "
        f"{_time(gap.ended_at)} UTC on {gap.host} pid {gap.pid} (the database was away): "
        "what ran then may be missing"
    )


def _job_json(job: Job) -> dict[str, Any]:
    return {
        "message_id": job.message_id,
        "listener": job.listener,
        "queue": job.queue,
        "state": job.state,
        "where": job.where,
        "tags": list(job.tags),
        "attempts": [
            {
                "attempt": attempt.attempt,
                "outcome": "published" if attempt.attempt == 0 else attempt.outcome,
                "host": attempt.host,
                "pid": attempt.pid,
                "started_at": attempt.started_at.isoformat(),
                "finished_at": attempt.finished_at.isoformat() if attempt.finished_at else None,
                "duration": attempt.duration,
                "next_queue": attempt.next_queue,
                "exception_type": attempt.exception_type,
                "exception_message": attempt.exception_message,
                "traceback": attempt.traceback,
            }
            for attempt in job.attempts
        ],
    }


def _gap_json(gap: Gap) -> dict[str, Any]:
    return {
        "host": gap.host,
        "pid": gap.pid,
        "started_at": gap.started_at.isoformat(),
        "ended_at": gap.ended_at.isoformat(),
        "dropped": gap.dropped,
    }


def _worker_json(worker: WorkerStatus) -> dict[str, Any]:
    return {
        "host": worker.host,
        "pid": worker.pid,
        "state": "lost" if worker.lost else "busy" if worker.busy else "idle",
        "listeners": list(worker.listeners),
        "running": [
            {"message_id": r.message_id, "listener": r.listener, "since": r.since.isoformat()}
            for r in worker.running
        ],
        "started_at": worker.started_at.isoformat(),
        "seen_at": worker.seen_at.isoformat(),
        "handled": worker.handled,
        "retried": worker.retried,
        "parked": worker.parked,
    }


def _duration(text: str) -> dt.timedelta:
    match = _DURATION.match(text.strip())
    if match is None:
        raise typer.BadParameter("use a number and a unit: 30s, 15m, 2h, 7d", param_hint="--since")
    return dt.timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _emit(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def _console() -> Console:
    # Piped into a file or a pager, rich would assume 80 columns and cut the message ids.
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)
