"""The web console: `amqp-listener web` serves these pages (the `[web]` extra).

Server-rendered (Starlette and Jinja2; the templates, CSS and JavaScript ship in the
package: no build step, no CDN). The overview refreshes itself by polling `/api/overview`;
the other live parts (workers, an unfinished job, the charts) by reloading their own page's
fragment. The Workers and Jobs pages and the charts read the job ledger (`JobSource`).
Parked messages are read and acted on through the operator commands, so a replay or purge
from the browser behaves as one from the CLI, and is as safe when interrupted. Safety rules
live in `listener._web_security`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from listener._web_data import BrokerSource, JobSource, LedgerError
from listener._web_graph import PAD, layout
from listener._web_security import CSRF_COOKIE, Credentials, Csrf, SecurityMiddleware
from listener.errors import BrokerError, ConfigurationError, ListenerError, PublishError
from listener.jobs import STATES, UNFINISHED, Activity

__all__ = ["Console", "create_app"]

HERE = Path(__file__).parent
PAGE_SIZE = 50
#: Seconds between the overview's refreshes in the browser (the server caches for 5 s).
REFRESH = 3
_MAX_FORM_BYTES = 1 << 20
_ACTIONS = {"replay": "Replay", "purge": "Purge"}


@dataclass(frozen=True, slots=True)
class Console:
    """What one console serves, and how."""

    broker: BrokerSource
    jobs: JobSource
    read_only: bool = False
    show_bodies: bool = False


def create_app(console: Console, credentials: Credentials | None = None) -> Starlette:
    """The ASGI app. With `credentials` that require something, every request must carry
    them."""
    templates = Jinja2Templates(directory=str(HERE / "web_templates"))
    templates.env.filters["when"] = _when
    templates.env.filters["took"] = _took
    csrf = Csrf()

    def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        cookie = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        context.update(
            read_only=console.read_only,
            csrf_token=csrf.token(cookie),
            nav=request.url.path,
            ledger=console.jobs.available,
        )
        response = templates.TemplateResponse(request, name, context, status_code=status)
        if CSRF_COOKIE not in request.cookies:
            response.set_cookie(CSRF_COOKIE, cookie, httponly=True, samesite="strict")
        return response

    async def counts() -> tuple[list[Any], float, Any, str | None]:
        """The listeners' counts and the delay levels', or what is missing to find the
        listeners (no modules named, and no management API to list their queues)."""
        try:
            rows, age = await _broker(console.broker.overview)
        except HTTPException as exc:
            if exc.status_code != 404 or console.broker.listeners is not None:
                raise
            return [], 0.0, None, str(exc.detail)
        return rows, age, await _broker(console.broker.delays), None

    async def overview(request: Request) -> Response:
        rows, age, delays, missing = await counts()
        # The counts come from the broker: a ledger that does not answer costs only the charts
        # (and the per-listener delayed counts, which only the ledger knows).
        try:
            activity, unread = await _ledger(console.jobs.activity), None
            delayed = await _ledger(console.jobs.delayed) if console.jobs.available else None
        except HTTPException as exc:
            activity, unread, delayed = [], exc.detail, None
        return render(
            request,
            "overview.html",
            rows=rows,
            missing=missing,
            delays=delays,
            delayed=delayed,
            age=age,
            refresh=REFRESH,
            jobs=console.jobs,
            charts=[_chart(item) for item in activity],
            unread=unread,
            chart_width=CHART_WIDTH,
            chart_height=CHART_HEIGHT,
        )

    async def overview_json(_request: Request) -> Response:
        rows, age, delays, missing = await counts()
        delayed: dict[str, int] = {}
        if console.jobs.available:
            with contextlib.suppress(HTTPException):  # the ledger's part only
                delayed = await _ledger(console.jobs.delayed)
        return JSONResponse(
            {
                "listeners": [
                    {**asdict(row), "delayed": delayed.get(row.queue, 0)} for row in rows
                ],
                "delay_levels": None if delays is None else asdict(delays),
                "age": round(age, 1),
                "missing": missing,
            }
        )

    async def parked_index(request: Request) -> Response:
        rows, _age, _delays, missing = await counts()
        return render(request, "parked_index.html", rows=rows, missing=missing)

    async def parked(request: Request) -> Response:
        queue = request.path_params["queue"]
        after = request.query_params.get("after") or None
        target, page = await _broker(console.broker.page, queue, limit=PAGE_SIZE, after=after)
        return render(request, "parked.html", queue=queue, target=target, page=page, after=after)

    async def message(request: Request) -> Response:
        queue = request.path_params["queue"]
        message_id = request.query_params.get("id", "")
        found = await _broker(console.broker.find, queue, message_id)
        if found is None:
            raise HTTPException(404, f"no parked message with id {message_id!r} in {queue}")
        body = _body_text(found.body) if console.show_bodies else None
        return render(request, "message.html", queue=queue, parked=found, body=body)

    async def confirm(request: Request) -> Response:
        queue = request.path_params["queue"]
        action = request.query_params.get("action", "")
        _refuse_if_read_only(console)
        if action not in _ACTIONS:
            raise HTTPException(400, "action must be replay or purge")
        ids = request.query_params.getlist("id")
        everything = request.query_params.get("all") == "1"
        if not ids and not everything:
            raise HTTPException(400, "select at least one message, or all")
        return render(
            request,
            "confirm.html",
            queue=queue,
            action=action,
            verb=_ACTIONS[action],
            ids=[] if everything else ids,
        )

    async def act(request: Request) -> Response:
        queue = request.path_params["queue"]
        _refuse_if_read_only(console)
        form = await _form(request)
        if not csrf.valid(request, _one(form, "csrf_token")):
            raise HTTPException(403, "missing or invalid CSRF token: reload the page and retry")
        action = _one(form, "action")
        if action not in _ACTIONS or _one(form, "confirmed") != "yes":
            raise HTTPException(400, "an action needs action=replay|purge and confirmed=yes")
        ids = form.get("id", [])
        if not ids and _one(form, "all") != "1":
            raise HTTPException(400, "select at least one message, or all")
        run = console.broker.replay if action == "replay" else console.broker.purge
        result = await _broker(run, queue, ids)
        return render(request, "done.html", queue=queue, action=action, result=result)

    async def topology(request: Request) -> Response:
        rows = console.broker.topology()
        return render(request, "topology.html", rows=rows, graph=layout(rows), pad=PAD)

    async def schedules(request: Request) -> Response:
        rows = await _broker(console.broker.schedules)
        return render(request, "schedules.html", rows=rows, given=bool(console.broker.listeners))

    async def workers(request: Request) -> Response:
        rows = await _ledger(console.jobs.workers)
        live = [worker for worker in rows if not worker.lost]
        return render(
            request,
            "workers.html",
            jobs=console.jobs,
            rows=rows,
            live=len(live),
            busy=sum(1 for worker in live if worker.busy),
            refresh=REFRESH,
        )

    async def jobs(request: Request) -> Response:
        search = {
            key: request.query_params.get(key, "").strip() or None
            for key in ("message_id", "listener", "state", "tag")
        }
        if search["state"] is not None and search["state"] not in STATES:
            raise HTTPException(400, f"state must be one of {', '.join(STATES)}")
        rows = await _ledger(
            lambda: console.jobs.jobs(
                message_id=search["message_id"],
                listener=search["listener"],
                state=search["state"],
                tag=search["tag"],
                limit=PAGE_SIZE,
            )
        )
        return render(
            request, "jobs.html", jobs=console.jobs, rows=rows, search=search, states=STATES
        )

    async def job(request: Request) -> Response:
        message_id = request.path_params["message_id"]
        found, gaps = await _ledger(console.jobs.story, message_id)
        if console.jobs.available and not found:
            more = " (records were dropped in a gap: it may have run then)" if gaps else ""
            raise HTTPException(404, f"no record of message {message_id!r} in the ledger{more}")
        return render(
            request,
            "job.html",
            jobs=console.jobs,
            message_id=message_id,
            found=found,
            gaps=gaps,
            live=any(item.state in UNFINISHED for item in found),
            refresh=REFRESH,
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return render(request, "error.html", status=exc.status_code, detail=exc.detail)

    routes = [
        Route("/", overview),
        Route("/api/overview", overview_json),
        Route("/parked", parked_index),
        Route("/parked/{queue}", parked),
        Route("/parked/{queue}/message", message),
        Route("/parked/{queue}/confirm", confirm),
        Route("/parked/{queue}/act", act, methods=["POST"]),
        Route("/topology", topology),
        Route("/schedules", schedules),
        Route("/workers", workers),
        Route("/jobs", jobs),
        Route("/jobs/{message_id}", job),
        Route("/favicon.ico", lambda _r: RedirectResponse("/static/favicon.svg")),
        Mount("/static", StaticFiles(directory=str(HERE / "web_static")), name="static"),
    ]
    middleware = [Middleware(SecurityMiddleware, credentials=credentials or Credentials())]
    return Starlette(
        routes=routes, middleware=middleware, exception_handlers={HTTPException: not_found}
    )


async def _broker(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a (synchronous) broker call in a thread; its errors become HTTP errors with the
    same one-line text the CLI prints (never a password: the errors redact URLs)."""
    try:
        return await run_in_threadpool(call, *args, **kwargs)
    except ConfigurationError as exc:
        raise HTTPException(404, str(exc)) from exc
    except (BrokerError, PublishError, ListenerError, OSError) as exc:
        raise HTTPException(502, f"the broker did not do it: {exc}") from exc


async def _ledger(call: Any, *args: Any) -> Any:
    """Run a (synchronous) ledger read in a thread; a database failure becomes a 502 with
    the one line `amqp-listener jobs` would print."""
    try:
        return await run_in_threadpool(call, *args)
    except LedgerError as exc:
        raise HTTPException(502, f"the job ledger did not answer: {exc}") from exc
    except ValueError as exc:  # a search the ledger refuses (an unknown state)
        raise HTTPException(400, str(exc)) from exc


def _refuse_if_read_only(console: Console) -> None:
    if console.read_only:
        raise HTTPException(403, "this console is read-only (--read-only): actions are off")


async def _form(request: Request) -> dict[str, list[str]]:
    # URL-encoded forms only (the console's own): no multipart parser needed.
    if request.headers.get("content-type", "").split(";")[0] != (
        "application/x-www-form-urlencoded"
    ):
        raise HTTPException(415, "actions take a URL-encoded form")
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        raise HTTPException(413, "form too large")
    return urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=False)


def _one(form: dict[str, list[str]], key: str) -> str | None:
    values = form.get(key)
    return values[0] if values else None


def _when(stamp: str) -> str:
    """An ISO time as `2026-12-07 05:10:00 UTC` (to the second; the page has no room)."""
    try:
        moment = dt.datetime.fromisoformat(stamp)
    except ValueError:
        return stamp or "-"
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _took(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


@dataclass(frozen=True, slots=True)
class Chart:
    """One listener's last hour as an inline SVG: per minute, a bar per outcome side by side
    (lines would hide each other when two outcomes count the same)."""

    listener: str
    # (outcome, its bars as (x, y, height), its total in the hour)
    series: tuple[tuple[str, tuple[tuple[float, float, float], ...], int], ...]
    peak: int
    bar: float


#: The charts' drawing size in SVG units.
CHART_WIDTH, CHART_HEIGHT = 240, 48


def _chart(activity: Activity) -> Chart:
    counts = (
        ("handled", activity.handled),
        ("failed", activity.failed),
        ("parked", activity.parked),
    )
    peak = max(max(values, default=0) for _, values in counts) or 1
    minute = CHART_WIDTH / max(len(activity.handled), 1)
    bar = minute / len(counts)
    series = []
    for offset, (name, values) in enumerate(counts):
        bars = []
        for index, value in enumerate(values):
            if value:
                height = max(value / peak * CHART_HEIGHT, 1.0)
                x = index * minute + offset * bar
                bars.append((round(x, 2), round(CHART_HEIGHT - height, 2), round(height, 2)))
        series.append((name, tuple(bars), sum(values)))
    return Chart(activity.listener, tuple(series), peak, round(bar, 2))


def _body_text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(body)} bytes, not UTF-8>"
