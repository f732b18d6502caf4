"""The operator commands' pika boundary (listener/_operator_connection.py): every pika or
socket error of an operation becomes an OperationFailed saying what to check."""

from __future__ import annotations

import pika.exceptions
import pytest

from listener._operator_connection import OperationFailed, translated
from listener.errors import ConfigurationError
from listener.operations import Operator
from listener.parked import ReplayResult


def test_a_refused_access_names_the_permissions_the_commands_need():
    refused = pika.exceptions.ChannelClosedByBroker(403, "ACCESS_REFUSED - no read on 'q'")
    with pytest.raises(OperationFailed) as caught, translated():
        raise refused
    text = str(caught.value)
    assert text.startswith("the broker refused access (ACCESS_REFUSED - no read on 'q')")
    assert "'<queue>.operator-lock'" in text
    assert caught.value.__cause__ is refused


def test_any_other_refusal_gives_the_brokers_code_and_text():
    with (
        pytest.raises(OperationFailed, match=r"^the broker refused \(406 PRECONDITION"),
        translated(),
    ):
        raise pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED - nope")


@pytest.mark.parametrize(
    "lost",
    [pika.exceptions.StreamLostError("eof"), ConnectionResetError(104, "reset")],
    ids=["pika", "socket"],
)
def test_a_lost_connection_says_nothing_parked_is_lost(lost):
    with pytest.raises(OperationFailed) as caught, translated():
        raise lost
    assert str(caught.value) == (
        f"the connection to the broker was lost ({type(lost).__name__}); nothing parked is "
        "lost: the broker takes back what the command held. Run it again"
    )


def test_what_a_replay_did_before_the_error_goes_along_with_it():
    lost = pika.exceptions.StreamLostError("eof")
    lost.partial_result = ReplayResult(done=["m-1"])  # type: ignore[attr-defined]
    with pytest.raises(OperationFailed) as caught, translated():
        raise lost
    assert caught.value.partial_result.done == ["m-1"]  # type: ignore[attr-defined]


def test_the_frameworks_own_errors_pass_through_untouched():
    own = ConfigurationError("no such target")
    with pytest.raises(ConfigurationError) as caught, translated():
        raise own
    assert caught.value is own


def test_an_operator_whose_connection_is_gone_raises_operation_failed(settings, unique):
    with Operator(settings) as operator:
        operator._connection.close()
        with pytest.raises(OperationFailed, match="connection to the broker was lost"):
            operator.target(f"{unique}.work")
