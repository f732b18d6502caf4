"""The web console's safety rules, in one place.

* Binding anything but loopback needs credentials (`bind_refusal`).
* With credentials, every request needs them: HTTP Basic (`--auth user:pass`) or a bearer
  token (`AMQP_LISTENER_WEB_TOKEN`); without, a 401 and no data.
* Every response, a 500 too, carries a Content-Security-Policy that allows only the
  console's own scripts and styles and forbids framing, plus nosniff, X-Frame-Options and
  Referrer-Policy.
* Actions are POSTs carrying a CSRF token: an HMAC, under a key made at start-up, of a
  random cookie set on the first page (a forged page can neither read the cookie nor
  compute the token).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Credentials", "Csrf", "SecurityMiddleware", "bind_refusal"]

HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

CSRF_COOKIE = "amqp_listener_csrf"


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who may use the console: a Basic user and password, a bearer token, or both."""

    user: str | None = None
    password: str | None = None
    token: str | None = None

    @classmethod
    def parse(cls, auth: str | None, token: str | None) -> Credentials:
        """From `--auth user:pass` and the token variable.

        Raises:
            ValueError: `auth` is not `user:pass` with both parts.
        """
        user = password = None
        if auth is not None:
            user, sep, password = auth.partition(":")
            if not sep or not user or not password:
                raise ValueError("--auth takes user:password, both non-empty")
        return cls(user, password, token or None)

    @property
    def required(self) -> bool:
        return self.password is not None or self.token is not None

    def allow(self, authorization: str) -> bool:
        """Whether an Authorization header value carries these credentials."""
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self.token is not None:
            return hmac.compare_digest(value.strip().encode(), self.token.encode())
        if scheme == "basic" and self.password is not None and self.user is not None:
            try:
                given = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            expected = f"{self.user}:{self.password}".encode()
            return hmac.compare_digest(given, expected)
        return False


def bind_refusal(host: str, credentials: Credentials) -> str | None:
    """Why the console must not start on `host`, or None when it may."""
    if credentials.required or _is_loopback(host):
        return None
    return (
        f"refusing to serve the console on {host} without authentication: pass "
        "--auth user:password or set AMQP_LISTENER_WEB_TOKEN, or bind 127.0.0.1"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Csrf:
    """CSRF tokens bound to a per-browser cookie."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def token(self, cookie: str) -> str:
        return hmac.new(self._key, cookie.encode(), hashlib.sha256).hexdigest()

    def valid(self, request: Request, token: str | None) -> bool:
        cookie = request.cookies.get(CSRF_COOKIE)
        if not cookie or not token:
            return False
        return hmac.compare_digest(self.token(cookie), token)


class SecurityMiddleware:
    """Authentication on every request, and the security headers on every response."""

    def __init__(self, app: ASGIApp, credentials: Credentials) -> None:
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.decode().lower() not in HEADERS
                ]
                headers += [(name.encode(), value.encode()) for name, value in HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        if self.credentials.required:
            authorization = Request(scope).headers.get("authorization", "")
            if not self.credentials.allow(authorization):
                refusal = _unauthorized(self.credentials)
                await refusal(scope, receive, send_with_headers)
                return
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Starlette's own 500 page is sent from outside this middleware, without the
            # headers: send one here (no detail), and let the error go on to be logged.
            if not started:
                failure = PlainTextResponse("500: the console failed; see its log.\n", 500)
                await failure(scope, receive, send_with_headers)
            raise


def _unauthorized(credentials: Credentials) -> Response:
    challenge = {}
    if credentials.password is not None:
        challenge["www-authenticate"] = 'Basic realm="amqp-listener", charset="UTF-8"'
    elif credentials.token is not None:
        challenge["www-authenticate"] = 'Bearer realm="amqp-listener"'
    return PlainTextResponse(
        "401: this console needs credentials (HTTP Basic, or a bearer token).\n",
        status_code=401,
        headers=challenge,
    )
