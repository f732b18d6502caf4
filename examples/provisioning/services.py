"""Stand-ins for the systems the provisioning listeners talk to: an account store, a mail
server and an outbox.

They keep their state as small files in one directory, `PROVISIONING_STATE_DIR` (default
`<tmp>/amqp-listener-provisioning`), so that the demo, in another process than the runner,
can see what the handlers did. Every operation is idempotent, as a handler's must be:
RabbitMQ delivers at least once, so any step may run twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["AccountStore", "MailServer", "MailServerBusy", "Outbox", "state_dir"]


def state_dir() -> Path:
    """The directory the stand-ins keep their files in (read at each call)."""
    default = Path(tempfile.gettempdir()) / "amqp-listener-provisioning"
    path = Path(os.environ.get("PROVISIONING_STATE_DIR") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


class AccountStore:
    """Accounts by id, one JSON file each."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or state_dir()) / "accounts"
        self.root.mkdir(parents=True, exist_ok=True)

    def open(self, account_id: int, username: str) -> None:
        """Record the account; opening it again changes nothing."""
        record = {"account_id": account_id, "username": username}
        (self.root / f"{account_id}.json").write_text(json.dumps(record))

    def opened(self) -> dict[int, str]:
        """{account_id: username} for every open account."""
        accounts = (json.loads(path.read_text()) for path in self.root.glob("*.json"))
        return {account["account_id"]: account["username"] for account in accounts}


class MailServerBusy(Exception):
    """The mail server asked us to try again later: a transient failure."""


class MailServer:
    """Creates mailboxes. It can be told to answer "busy" once for a user, like a real
    server under load, and logs every request so the demo can show the retry."""

    domain = "example.org"

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or state_dir()) / "mail-server"
        (self.root / "busy").mkdir(parents=True, exist_ok=True)
        (self.root / "mailboxes").mkdir(exist_ok=True)

    def busy_once(self, username: str) -> None:
        """The next request for `username`'s mailbox will be answered "busy"."""
        (self.root / "busy" / username).touch()

    def create_mailbox(self, username: str) -> str:
        """Create the mailbox (or find it made) and return its address.

        Raises:
            MailServerBusy: the server is busy; the same request will work later.
        """
        try:
            (self.root / "busy" / username).unlink()
        except FileNotFoundError:
            pass
        else:
            self._log(f"{username} busy")
            raise MailServerBusy("the mail server is busy; try again in a moment")
        (self.root / "mailboxes" / username).mkdir(exist_ok=True)
        self._log(f"{username} created")
        return f"{username}@{self.domain}"

    def requests(self) -> list[str]:
        """Every request so far, oldest first: `"<username> busy"` or `"<username> created"`."""
        log = self.root / "requests.log"
        return log.read_text().splitlines() if log.exists() else []

    def _log(self, line: str) -> None:
        with (self.root / "requests.log").open("a") as log:
            log.write(line + "\n")


class Outbox:
    """Sent mail, one file per recipient (a resend overwrites it)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or state_dir()) / "outbox"
        self.root.mkdir(parents=True, exist_ok=True)

    def send(self, to: str, subject: str, text: str) -> None:
        (self.root / to).write_text(f"To: {to}\nSubject: {subject}\n\n{text}\n")

    def sent(self) -> list[str]:
        """The recipients mailed so far, sorted."""
        return sorted(path.name for path in self.root.iterdir())
