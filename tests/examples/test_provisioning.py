"""The provisioning example: a chain of three listeners, in memory and against RabbitMQ."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from examples.provisioning.listeners import (
    AccountRequested,
    CreateMailbox,
    MailboxRequested,
    OpenAccount,
    SendWelcome,
    WelcomeRequested,
)
from examples.provisioning.services import AccountStore, MailServer, MailServerBusy, Outbox
from listener import InvalidMessage
from listener.testing import MemoryBroker

CHAIN = (OpenAccount, CreateMailbox, SendWelcome)


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets empty stand-ins for the account store, mail server and outbox."""
    monkeypatch.setenv("PROVISIONING_STATE_DIR", str(tmp_path))
    return tmp_path


def test_a_reserved_username_is_parked_at_once_and_goes_no_further() -> None:
    with MemoryBroker(*CHAIN) as broker:
        OpenAccount.notify(account_id=3, username="postmaster")
        broker.join(fail_fast=False)
    [parked] = broker.parked(OpenAccount)
    assert parked.reason == "rejected"
    assert parked.attempts == 1
    assert parked.exception_message == "account 3: the username is reserved"
    assert broker.handled(OpenAccount) == []
    assert [m.routing_key for m in broker.published] == ["account_requested"]
    assert AccountStore().opened() == {}


def test_a_username_the_model_refuses_is_never_sent() -> None:
    with MemoryBroker(*CHAIN) as broker, pytest.raises(InvalidMessage, match="username"):
        OpenAccount.notify(account_id=4, username="Not A Name")
    assert broker.published == []


def test_a_mail_server_that_stays_busy_parks_only_the_mailbox_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def busy(self: MailServer, username: str) -> str:
        raise MailServerBusy("the mail server is busy; try again in a moment")

    monkeypatch.setattr(MailServer, "create_mailbox", busy)
    with MemoryBroker(*CHAIN) as broker:
        OpenAccount.notify(account_id=1, username="ada")
        broker.join(fail_fast=False)
    [parked] = broker.parked(CreateMailbox)
    assert parked.reason == "failed"
    assert parked.attempts == CreateMailbox.max_attempts
    assert parked.exception_type.endswith("MailServerBusy")
    assert AccountStore().opened() == {1: "ada"}  # the step before it stays done
    assert broker.handled(SendWelcome) == []


def test_a_busy_mail_server_is_retried_and_the_chain_completes() -> None:
    MailServer().busy_once("ada")
    with MemoryBroker(*CHAIN) as broker:
        OpenAccount.notify(account_id=1, username="ada")
        broker.join(fail_fast=False)
    assert MailServer().requests() == ["ada busy", "ada created"]
    assert broker.parked(CreateMailbox) == []
    assert broker.handled(CreateMailbox) == [MailboxRequested(account_id=1, username="ada")]
    assert Outbox().sent() == ["ada@example.org"]


def test_an_account_request_runs_the_whole_chain() -> None:
    with MemoryBroker(*CHAIN, fail_fast=True) as broker:
        OpenAccount.notify(account_id=2, username="grace")
        broker.join()
    assert broker.handled(OpenAccount) == [AccountRequested(account_id=2, username="grace")]
    assert broker.handled(CreateMailbox) == [MailboxRequested(account_id=2, username="grace")]
    assert broker.handled(SendWelcome) == [
        WelcomeRequested(account_id=2, address="grace@example.org")
    ]
    assert [m.routing_key for m in broker.published] == [
        "account_requested",
        "mailbox_requested",
        "welcome_requested",
    ]
    assert Outbox().sent() == ["grace@example.org"]


@pytest.mark.slow
def test_the_demo_runs_the_chain_against_rabbitmq_and_deletes_its_queues(
    run_demo: Callable[[str], subprocess.CompletedProcess[str]], rabbit
) -> None:
    result = run_demo("examples.provisioning.demo")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "OpenAccount    opened accounts 1 (ada), 2 (grace)" in out
    assert "ada busy" in out and "ada created" in out
    assert "welcome mails sent to ada@example.org, grace@example.org" in out
    assert "x-parked-reason: rejected" in out
    assert "x-exception-message: account 3: the username is reserved" in out
    assert "outcome: as expected" in out
    queues = re.search(r"queues: (\S+), (\S+), (\S+)", out)
    assert queues is not None
    for queue in queues.groups():
        assert not rabbit.exists(queue)
        assert not rabbit.exists(f"{queue}.dead")
