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
    def at(cls, settings: Settings) -> ManagementAPI:
        """Where the API would be for these settings (nothing is asked yet)."""
        url = urllib.parse.urlsplit(settings.urls[0])  # a cluster's first node
        if settings.management_url:
            base = settings.management_url
        else:
            scheme, port = ("https", 15671) if url.scheme == "amqps" else ("http", 15672)
            base = f"{scheme}://{url.hostname or 'localhost'}:{port}"
        vhost = urllib.parse.unquote(url.path[1:]) if len(url.path) > 1 else "/"
        return cls(
            base,
            urllib.parse.unquote(url.username or "guest"),
            urllib.parse.unquote(url.password or "guest"),
            vhost,
        )

    @classmethod
    def probe(cls, settings: Settings) -> ManagementAPI | None:
        """The API if it answers with these credentials, else None (never raises)."""
        api = cls.at(settings)
        try:
            api._get("/api/overview")
        except (OSError, ValueError):
            return None
        return api

    def queues(self) -> dict[str, dict[str, Any]]:
        """Every queue of the vhost with its counts, by name: one request, however many.

        Raises:
            OSError: the API did not answer (or refused these credentials).
            ValueError: it answered something else than JSON.
        """
        columns = "name,messages_ready,messages_unacknowledged,consumers,message_stats"
        records = self._get(f"/api/queues/{_quote(self.vhost)}?columns={columns}")
        if not isinstance(records, list):
            raise ValueError("the management API's queue list is not a list")
        return {
            str(record["name"]): record
            for record in records
            if isinstance(record, dict) and "name" in record
        }

    def _get(self, path: str) -> Any:
        request = urllib.request.Request(self.base + path, headers={"Authorization": self._auth})
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            return json.load(response)


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")
