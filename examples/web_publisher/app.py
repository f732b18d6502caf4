"""A web service that hands work to a listener: `POST /cases/{case_id}/copies` queues a
FileCopier job and answers 202 with the message id once RabbitMQ has confirmed it.

Run it:   uvicorn examples.web_publisher.app:app
Ask it:   curl -i -X POST localhost:8000/cases/7/copies -H 'content-type: application/json' \\
               -d '{"src": "/data/a.pdf", "dst": "/archive/a.pdf"}'

- 202 `{"message_id": ...}`: the broker has the job; it will be handled, retried or parked.
- 422: the request was wrong; nothing was sent.
- 503: the job is not known to be queued (the broker is down, refused it, or did not confirm
  in time); the body says whether it may have been queued after all, with the message id to
  recognise it. Retry later: FileCopier is idempotent, so a duplicate is harmless.

The endpoints are `async`, so they publish with `anotify()`, which never blocks the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import Body, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

from examples.file_copier.listeners import FileCopier
from listener import InvalidMessage, PublishConnectionLost, PublishError, PublishTimeout
from listener.apublisher import default_async_publisher

log = logging.getLogger("examples.web_publisher")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # Close this event loop's publishing connection cleanly, instead of dropping it at exit.
    await default_async_publisher().aclose()


app = FastAPI(title="Case file copies", lifespan=lifespan)


class CopyOrder(BaseModel):
    """What a client sends: where to copy from and to, both absolute paths."""

    src: str = Field(min_length=1)
    dst: str = Field(min_length=1)

    @field_validator("src", "dst")
    @classmethod
    def _absolute(cls, path: str) -> str:
        # FileCopier parks a relative destination; saying so now spares a parked message.
        if not PurePosixPath(path).is_absolute():
            raise ValueError("must be an absolute path")
        return path


class Queued(BaseModel):
    """The broker confirmed the job: it is queued under this id."""

    message_id: str


class Batch(BaseModel):
    """The broker confirmed every job of the batch, in this order."""

    message_ids: list[str]


@app.post("/cases/{case_id}/copies", status_code=202)
async def request_copy(case_id: Annotated[int, Path(ge=1)], order: CopyOrder) -> Queued:
    """Queue one copy; returns only after the broker confirmed it."""
    message_id = await FileCopier.anotify(case_id=case_id, src=order.src, dst=order.dst)
    return Queued(message_id=message_id)


@app.post("/copies", status_code=202)
async def request_copies(
    requests: Annotated[list[dict[str, Any]], Body(min_length=1, max_length=100)],
) -> Batch:
    """Queue a batch of FileCopier messages as they are (`case_id`, `src`, `dst`).

    The listener's own model validates them (an InvalidMessage is a 422, and nothing is
    sent); the confirms are pipelined, so the batch costs about one round trip.
    """
    return Batch(message_ids=await FileCopier.anotify_many(requests))


@app.exception_handler(InvalidMessage)
async def invalid_message(request: Request, exc: Exception) -> JSONResponse:
    # The same shape as FastAPI's own 422s. The text names the fields and what is wrong
    # with them, never the values.
    error = {"type": "invalid_message", "loc": ["body"], "msg": str(exc)}
    return JSONResponse(status_code=422, content={"detail": [error]})


@app.exception_handler(PublishError)
async def not_queued(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PublishError)
    # The framework's errors hold no password and no message body: safe to log.
    log.warning("%s %s: not queued: %s", request.method, request.url.path, exc)
    content: dict[str, Any] = {"error": type(exc).__name__}
    if isinstance(exc, PublishTimeout | PublishConnectionLost):
        content["detail"] = (
            "the message broker did not confirm the job in time: it may have been queued "
            "anyway; retry later (a duplicate is harmless)"
        )
        content["message_id"] = exc.message_id
    else:
        content["detail"] = "the job was not queued: the message broker is unavailable; retry later"
    return JSONResponse(status_code=503, content=content, headers={"Retry-After": "5"})
