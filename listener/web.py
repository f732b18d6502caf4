"""The web console: `amqp-listener web` serves these pages (the `[web]` extra).

Server-rendered (Starlette and Jinja2; the templates, CSS and JavaScript ship in the
package: no build step, no CDN). The overview refreshes itself by polling `/api/overview`.
Parked messages are read and acted on through the operator commands, so a replay or purge
from the browser behaves as one from the CLI, and is as safe when interrupted. Safety rules
live in `listener._web_security`.
"""

from __future__ import annotations

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

from listener._web_data import BrokerSource, JobSource
from listener._web_security import CSRF_COOKIE, Credentials, Csrf, SecurityMiddleware
from listener.errors import BrokerError, ConfigurationError, ListenerError, PublishError

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
    csrf = Csrf()

    def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        cookie = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        context.update(
            read_only=console.read_only,
            csrf_token=csrf.token(cookie),
            nav=request.url.path,
        )
        response = templates.TemplateResponse(request, name, context, status_code=status)
        if CSRF_COOKIE not in request.cookies:
            response.set_cookie(CSRF_COOKIE, cookie, httponly=True, samesite="strict")
        return response

    async def overview(request: Request) -> Response:
        rows, age = await _broker(console.broker.overview)
        return render(request, "overview.html", rows=rows, age=age, refresh=REFRESH)

    async def overview_json(_request: Request) -> Response:
        rows, age = await _broker(console.broker.overview)
        return JSONResponse({"listeners": [asdict(row) for row in rows], "age": round(age, 1)})

    async def parked_index(request: Request) -> Response:
        rows, _ = await _broker(console.broker.overview)
        return render(request, "parked_index.html", rows=rows)

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
        return render(request, "topology.html", rows=console.broker.topology())

    async def workers(request: Request) -> Response:
        rows = await run_in_threadpool(console.jobs.workers) if console.jobs.available else []
        return render(request, "workers.html", jobs=console.jobs, rows=rows)

    async def jobs(request: Request) -> Response:
        search = {
            key: request.query_params.get(key) or None
            for key in ("message_id", "listener", "state", "tag")
        }
        rows: list[dict[str, Any]] = []
        if console.jobs.available:
            rows = await run_in_threadpool(
                lambda: console.jobs.jobs(
                    message_id=search["message_id"],
                    listener=search["listener"],
                    state=search["state"],
                    tag=search["tag"],
                )
            )
        return render(request, "jobs.html", jobs=console.jobs, rows=rows, search=search)

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
        Route("/workers", workers),
        Route("/jobs", jobs),
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


def _body_text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(body)} bytes, not UTF-8>"
