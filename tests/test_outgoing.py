"""The outgoing message record (listener/_outgoing.py): what each path builds, and how the
pika and aiormq backends put the same record on the wire."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time

import pika
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from listener import _outgoing
from listener._aiormq_backend import aiormq_properties
from listener._outgoing import KEPT_PROPERTIES, Outgoing
from listener._pika_backend import pika_properties
from listener.parked import Parked

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0x00F067AA0BA902B7


def a_span() -> NonRecordingSpan:
    return NonRecordingSpan(
        SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1))
    )


def full_properties(**changes: object) -> pika.BasicProperties:
    fields: dict[str, object] = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "headers": {"x-attempts": 2},
        "delivery_mode": 1,
        "priority": 5,
        "correlation_id": "corr",
        "reply_to": "replies",
        "expiration": "60000",
        "message_id": "m-1",
        "timestamp": 1_700_000_000,
        "type": "kind",
        "user_id": "guest",
        "app_id": "shop",
    }
    fields.update(changes)
    return pika.BasicProperties(**fields)


def test_a_new_message_has_a_fresh_id_this_second_json_and_is_persistent():
    before = int(time.time())
    message = _outgoing.new(b"{}")
    after = int(time.time())
    assert len(message.message_id) == 32 and int(message.message_id, 16) >= 0
    assert before <= (message.timestamp or 0) <= after
    assert message.content_type == "application/json"
    assert message.content_encoding is None
    assert message.persistent is True
    assert message.headers is None
    assert _outgoing.new(b"{}").message_id != message.message_id


def test_a_new_message_copies_the_headers_it_is_given_and_never_changes_them():
    given = {"tenant": "a"}
    message = _outgoing.new(b"{}", given)
    assert message.headers == {"tenant": "a"}
    assert message.headers is not given
    assert _outgoing.new(b"{}", {}).headers is None


def test_a_new_message_carries_the_current_trace_context_in_its_headers():
    with trace.use_span(a_span()):
        message = _outgoing.new(b"{}", {"tenant": "a"})
    assert message.headers is not None
    assert message.headers["tenant"] == "a"
    assert message.headers["traceparent"] == f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"


def test_the_record_is_frozen():
    message = _outgoing.new(b"{}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.body = b"[]"  # type: ignore[misc]


def test_a_copy_keeps_every_kept_property_but_not_expiration_user_id_or_delivery_mode():
    headers = {"x-attempts": 3, "traceparent": "kept as it came"}
    copy = _outgoing.copy_of(full_properties(), b"body", message_id="m-1", headers=headers)
    assert copy == Outgoing(
        b"body",
        "m-1",
        1_700_000_000,
        headers,
        content_type="application/json",
        content_encoding="utf-8",
        persistent=True,
        priority=5,
        correlation_id="corr",
        reply_to="replies",
        type="kind",
        app_id="shop",
    )
    sent = pika_properties(copy)
    assert sent.expiration is None and sent.user_id is None
    assert sent.delivery_mode == 2


def test_a_copy_of_a_message_without_properties_sends_none_of_them():
    bare = pika.BasicProperties()
    copy = _outgoing.copy_of(bare, b"x", message_id="given-id", headers={"a": 1})
    sent = pika_properties(copy)
    assert sent.message_id == "given-id"
    assert (sent.content_type, sent.timestamp, sent.priority, sent.app_id) == (None,) * 4


def test_a_replay_keeps_what_the_parked_message_was_read_with_and_nothing_more():
    parked = Parked.read(full_properties(), b"body")
    assert set(parked.properties) <= set(KEPT_PROPERTIES)
    copy = _outgoing.replayed(parked.properties, parked.body, {"x-replays": 1})
    sent = pika_properties(copy)
    for name in KEPT_PROPERTIES:
        assert getattr(sent, name) == getattr(full_properties(), name), name
    assert sent.headers == {"x-replays": 1}
    assert sent.delivery_mode == 2
    assert sent.expiration is None and sent.user_id is None


def test_a_replayed_message_that_never_had_an_id_is_sent_without_one():
    parked = Parked.read(pika.BasicProperties(delivery_mode=2), b"{}")
    copy = _outgoing.replayed(parked.properties, parked.body, {})
    assert pika_properties(copy).message_id is None
    assert aiormq_properties(copy).message_id is None
    assert pika_properties(copy).content_type is None


@pytest.mark.parametrize(
    "created_at",
    [
        dt.datetime(2024, 5, 1, 12, 0, 30, 900_000, tzinfo=dt.UTC),
        dt.datetime(2024, 5, 1, 12, 0, 30, 900_000),  # SQLite: stored in UTC, read naive
        dt.datetime(2024, 5, 1, 14, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    ],
    ids=["aware", "naive", "other-zone"],
)
def test_a_relayed_row_is_stamped_with_the_second_it_was_written(created_at):
    message = _outgoing.relayed(b"{}", "row-id", created_at, {"traceparent": "from the write"})
    assert message.timestamp == int(dt.datetime(2024, 5, 1, 12, 0, 30, tzinfo=dt.UTC).timestamp())
    assert message.message_id == "row-id"
    assert message.headers == {"traceparent": "from the write"}
    assert message.content_type == "application/json" and message.persistent


def test_pika_and_aiormq_put_the_same_record_on_the_wire_alike():
    message = _outgoing.copy_of(full_properties(), b"b", message_id="m-1", headers={"h": 1})
    on_pika = pika_properties(message)
    on_aiormq = aiormq_properties(message)
    assert on_aiormq.timestamp == dt.datetime.fromtimestamp(1_700_000_000, dt.UTC)
    assert on_aiormq.message_type == on_pika.type == "kind"
    for name in (
        "content_type",
        "content_encoding",
        "headers",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "message_id",
        "app_id",
        "expiration",
        "user_id",
    ):
        assert getattr(on_aiormq, name) == getattr(on_pika, name), name


def test_a_record_without_a_timestamp_is_sent_without_one():
    message = dataclasses.replace(_outgoing.new(b"{}"), timestamp=None)
    assert pika_properties(message).timestamp is None
    assert aiormq_properties(message).timestamp is None
