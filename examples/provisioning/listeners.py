"""A chain of listeners: an account request opens the account, which asks for a mailbox,
which asks for a welcome mail.

    AccountRequested -> OpenAccount -> CreateMailbox -> SendWelcome

Each step is a listener of its own, with its own queue, retries and dead-letter queue. A step
hands over to the next by notifying it once its own work is done; if that notify fails, the
step fails and is retried, and since every step is idempotent, doing it again is harmless.
A failing step is retried or parked alone: the steps before it stay done.

Run it:   amqp-listener run examples.provisioning.listeners
Ask it:   OpenAccount.notify(account_id=1, username="ada")
Watch it: python -m examples.provisioning.demo
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from examples.provisioning.services import AccountStore, MailServer, Outbox
from listener import Listener, Reject

#: Names the mail system keeps for itself: no retry can make them available.
RESERVED = frozenset({"abuse", "admin", "postmaster", "root"})


class AccountRequested(BaseModel):
    account_id: int
    username: str = Field(pattern=r"^[a-z][a-z0-9_.-]{1,31}$")


class MailboxRequested(BaseModel):
    account_id: int
    username: str


class WelcomeRequested(BaseModel):
    account_id: int
    address: str


class OpenAccount(Listener):
    """Step 1: open the account, unless the name is reserved (a permanent failure)."""

    subscribes_to = "provisioning.account_requested"
    max_attempts = 3
    retry_delays = (1,)

    def handle(self, message: AccountRequested) -> None:
        if message.username in RESERVED:
            # Retrying cannot help: park it at once, with the reason, for a person to see.
            raise Reject(f"account {message.account_id}: the username is reserved")
        AccountStore().open(message.account_id, message.username)
        CreateMailbox.notify(account_id=message.account_id, username=message.username)


class CreateMailbox(Listener):
    """Step 2: create the mailbox. The mail server may be busy (a transient failure): the
    exception makes the framework retry after 1 s, then 2 s, before parking."""

    subscribes_to = "provisioning.mailbox_requested"
    max_attempts = 4
    retry_delays = (1, 2)

    async def handle(self, message: MailboxRequested) -> None:
        # The mail server's client blocks: keep it off the worker's event loop.
        address = await asyncio.to_thread(MailServer().create_mailbox, message.username)
        await SendWelcome.anotify(account_id=message.account_id, address=address)


class SendWelcome(Listener):
    """Step 3: send the welcome mail."""

    subscribes_to = "provisioning.welcome_requested"
    max_attempts = 5
    retry_delays = (1, 5, 30)

    def handle(self, message: WelcomeRequested) -> None:
        Outbox().send(
            message.address,
            subject="Welcome",
            text=f"Your account {message.account_id} and its mailbox are ready.",
        )
