"""End-to-end demo of a chain of listeners: three account requests; one goes straight
through, one meets a busy mail server and is retried, one asks for a reserved name and is
parked.

    python -m examples.provisioning.demo        (or: make examples)

Needs RabbitMQ at AMQP_URL (default amqp://guest:guest@localhost:5672/%2F). The demo's queues
get a prefix of their own (AMQP_LISTENER_QUEUE_PREFIX=demo-<random>) and are deleted at the
end. Exit code 0 when everything happened as expected, 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from examples.demo_kit import (
    Broker,
    DemoFailed,
    line_buffered_stdout,
    start_runner,
    stop_runner,
    wait,
)
from examples.provisioning.services import AccountStore, MailServer, Outbox
from listener.settings import get_settings

HEADERS = ("x-parked-reason", "x-attempts", "x-exception-type", "x-exception-message")


def main() -> int:
    line_buffered_stdout()
    # Settings are read once, and queue names fixed when the listener classes are created:
    # the prefix goes into the environment first (the runner inherits it).
    os.environ["AMQP_LISTENER_QUEUE_PREFIX"] = f"demo-{uuid.uuid4().hex[:8]}"
    broker = Broker(get_settings().url.get_secret_value())
    state = Path(tempfile.mkdtemp(prefix="provisioning-demo-"))
    os.environ["PROVISIONING_STATE_DIR"] = str(state)
    from examples.provisioning.listeners import CreateMailbox, OpenAccount, SendWelcome

    chain = (OpenAccount, CreateMailbox, SendWelcome)
    code = None
    try:
        print("1. starting the runner: amqp-listener run examples.provisioning.listeners")
        print(f"   queues: {', '.join(cls.queue for cls in chain)}")
        runner = start_runner(["examples.provisioning.listeners"])
        try:
            broker.wait_consuming(runner, chain)

            MailServer().busy_once("ada")
            print("2. the mail server will answer 'busy' once, to the request for ada's mailbox")
            print("3. requesting three accounts: ada, grace, and postmaster (a reserved name)")
            OpenAccount.notify(account_id=1, username="ada")
            OpenAccount.notify(account_id=2, username="grace")
            reserved = OpenAccount.notify(account_id=3, username="postmaster")

            wait(lambda: len(Outbox().sent()) >= 2, "the two welcome mails", timeout=30)
            headers = wait(
                lambda: broker.parked(OpenAccount.queue).get(reserved),
                "the reserved name to be parked",
            )
            _report(headers, OpenAccount.queue)
            _check(headers, later_parked=[broker.parked(c.queue) for c in chain[1:]])
        finally:
            print("7. SIGTERM to the runner: it drains and exits")
            code = stop_runner(runner)
            print(f"   runner exit code: {code}")
    finally:
        broker.delete(chain)
        broker.close()
        shutil.rmtree(state, ignore_errors=True)
        print("   deleted the demo's queues and state")
    if code != 0:
        raise DemoFailed(f"the runner exited with code {code}")
    print("outcome: as expected (2 handled, 1 retried then handled, 1 parked)")
    return 0


def _report(headers: dict[str, Any], queue: str) -> None:
    accounts = AccountStore().opened()
    print("4. handled:")
    opened = ", ".join(f"{account_id} ({name})" for account_id, name in sorted(accounts.items()))
    print(f"     OpenAccount    opened accounts {opened}")
    print(f"     CreateMailbox  mail server requests: {', '.join(MailServer().requests())}")
    print(f"     SendWelcome    welcome mails sent to {', '.join(Outbox().sent())}")
    print("5. retried: CreateMailbox for ada: the mail server was busy, the framework retried")
    print("   after 1 s, and the second attempt created the mailbox")
    print(f"6. parked in {queue}.dead:")
    for key in HEADERS:
        print(f"     {key}: {headers.get(key)}")


def _check(headers: dict[str, Any], later_parked: list[dict[str, Any]]) -> None:
    requests = MailServer().requests()
    expected = {
        "accounts opened": (AccountStore().opened(), {1: "ada", 2: "grace"}),
        "ada's mailbox requests": (
            [r for r in requests if r.startswith("ada ")],
            ["ada busy", "ada created"],
        ),
        "grace's mailbox requests": (
            [r for r in requests if r.startswith("grace ")],
            ["grace created"],
        ),
        "welcome mails": (Outbox().sent(), ["ada@example.org", "grace@example.org"]),
        "park reason": (headers.get("x-parked-reason"), "rejected"),
        "attempts before parking": (headers.get("x-attempts"), 1),
        "messages parked by later steps": (sum(map(len, later_parked)), 0),
    }
    for what, (seen, wanted) in expected.items():
        if seen != wanted:
            raise DemoFailed(f"{what}: expected {wanted!r}, saw {seen!r}")


if __name__ == "__main__":
    sys.exit(main())
