"""The RabbitMQ management plugin's HTTP API, when the broker has it: more detail for
`amqp-listener status` (unacked counts, rates) than AMQP alone can give.

Optional by design: every caller falls back to passive declares when the API does not
answer. The API's address is the broker's host on port 15672 (15671 for amqps), or the
`management_url` setting; the credentials are the broker URL's.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from listener.settings import Settings

__all__ = ["ManagementAPI"]

#: Seconds the probe and each request may take: status must not hang on a firewalled port.
_TIMEOUT = 3.0


class ManagementAPI:
    """A few read-only calls to the management API."""

    def __init__(self, base: str, user: str, password: str, vhost: str) -> None:
        self.base = base.rstrip("/")
        self.vhost = vhost
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"

    @classmethod
    def probe(cls, settings: Settings) -> ManagementAPI | None:
        """The API if it answers with these credentials, else None (never raises)."""
        url = urllib.parse.urlsplit(settings.urls[0])  # a cluster's first node
        if settings.management_url:
            base = settings.management_url
        else:
            scheme, port = ("https", 15671) if url.scheme == "amqps" else ("http", 15672)
            base = f"{scheme}://{url.hostname or 'localhost'}:{port}"
        vhost = urllib.parse.unquote(url.path[1:]) if len(url.path) > 1 else "/"
        api = cls(
            base,
            urllib.parse.unquote(url.username or "guest"),
            urllib.parse.unquote(url.password or "guest"),
            vhost,
        )
        try:
            api._get("/api/overview")
        except (OSError, ValueError):
            return None
        return api

    def queue(self, name: str) -> dict[str, Any] | None:
        """The queue's record, or None when it does not exist."""
        path = f"/api/queues/{_quote(self.vhost)}/{_quote(name)}"
        try:
            record: dict[str, Any] = self._get(path)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return record

    def queue_names(self) -> list[str]:
        """Every queue of the vhost."""
        records = self._get(f"/api/queues/{_quote(self.vhost)}?columns=name")
        return [str(record["name"]) for record in records if isinstance(record, dict)]

    def _get(self, path: str) -> Any:
        request = urllib.request.Request(self.base + path, headers={"Authorization": self._auth})
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            return json.load(response)


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")
