"""What a listener declares on the broker, described as data."""

from __future__ import annotations

import pytest

from listener.topology import (
    DELIVERY_LIMIT,
    default_queue_name,
    delay_queue_name,
    describe,
    snake_case,
)

QUORUM_ONLY = ("x-queue-type", "x-dead-letter-strategy", "x-overflow", "x-delivery-limit")


def topology(retry_delays=(1, 5, 30), queue_type="quorum"):
    return describe(
        exchange="case_files",
        binding_key="copy_requested",
        queue="file_copier",
        retry_delays=retry_delays,
        queue_type=queue_type,
    )


# -- main queue ----------------------------------------------------------------------------


def test_the_quorum_main_queue_dead_letters_safely_to_its_dead_queue():
    main = topology().queue
    assert main.name == "file_copier"
    assert main.arguments == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "file_copier.dead",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": DELIVERY_LIMIT,
    }
    assert DELIVERY_LIMIT == 20


def test_a_classic_main_queue_has_no_quorum_only_arguments():
    main = topology(queue_type="classic").queue
    for argument in QUORUM_ONLY:
        assert argument not in main.arguments
    assert main.arguments == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "file_copier.dead",
    }


def test_the_exchange_and_binding_are_passed_through():
    described = topology()
    assert (described.exchange, described.binding_key) == ("case_files", "copy_requested")


# -- dead queue ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queue_type", "arguments"),
    [
        # The unreachable delivery limit keeps a peeked message in its place on a quorum
        # queue (without one, a message handed back goes to the back of the queue).
        ("quorum", {"x-queue-type": "quorum", "x-delivery-limit": 2**31 - 1}),
        ("classic", {}),
    ],
)
def test_the_dead_queue_keeps_messages_and_their_order(queue_type, arguments):
    dead = topology(queue_type=queue_type).dead
    assert dead.name == "file_copier.dead"
    assert dead.arguments == arguments


def test_the_dead_queue_is_declared_first():
    queues = topology().queues
    assert queues[0].name == "file_copier.dead"
    assert queues[-1].name == "file_copier"
    assert [q.name for q in queues] == [
        "file_copier.dead",
        "file_copier.retry.1s",
        "file_copier.retry.5s",
        "file_copier.retry.30s",
        "file_copier",
    ]


# -- delay queues --------------------------------------------------------------------------


def test_there_is_one_delay_queue_per_distinct_non_zero_delay():
    described = topology(retry_delays=(5, 0, 1.5, 5, 5.0, 1.5, 0))
    assert [q.name for q in described.delays] == [
        "file_copier.retry.1500ms",
        "file_copier.retry.5s",
    ]


def test_delays_that_round_to_the_same_millisecond_share_a_queue():
    described = topology(retry_delays=(0.25, 0.2501, 0.0001))
    assert [q.name for q in described.delays] == ["file_copier.retry.250ms"]


def test_no_retry_delays_means_no_retry_queues():
    assert topology(retry_delays=()).delays == ()
    assert topology(retry_delays=(0, 0.0)).delays == ()
    names = [q.name for q in topology(retry_delays=()).queues]
    assert names == ["file_copier.dead", "file_copier"]


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_the_shared_delay_levels_are_quorum_queues_whatever_the_listeners_queue_type(
    queue_type,
):
    described = topology(queue_type=queue_type)
    assert len(described.levels) == 27  # 26 levels and the unrouted queue
    assert {spec.arguments["x-queue-type"] for spec in described.levels} == {"quorum"}
    assert topology(queue_type="classic").levels == topology(queue_type="quorum").levels


def test_a_level_dead_letters_to_the_level_below_and_level_zero_to_the_out_exchange():
    levels = {spec.name: spec.arguments for spec in topology().levels}
    assert levels["amqp-listener.delay.07"]["x-dead-letter-exchange"] == "amqp-listener.delay.06"
    assert levels["amqp-listener.delay.07"]["x-message-ttl"] == 125 * 2**7
    assert levels["amqp-listener.delay.00"]["x-dead-letter-exchange"] == "amqp-listener.delay.out"
    assert all("x-dead-letter-routing-key" not in arguments for arguments in levels.values())


def test_a_quorum_delay_queue_expires_back_into_the_main_queue():
    (delay,) = topology(retry_delays=(5,)).delays
    assert delay.name == "file_copier.retry.5s"
    assert delay.arguments == {
        "x-queue-type": "quorum",
        "x-message-ttl": 5000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "file_copier",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def test_a_classic_delay_queue_has_a_ttl_and_no_quorum_only_arguments():
    (delay,) = topology(retry_delays=(1.5,), queue_type="classic").delays
    assert delay.name == "file_copier.retry.1500ms"
    assert delay.arguments == {
        "x-message-ttl": 1500,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "file_copier",
    }


@pytest.mark.parametrize(
    ("delay", "name", "ttl"),
    [
        (5, "q.retry.5s", 5000),
        (1.5, "q.retry.1500ms", 1500),
        (0.1, "q.retry.100ms", 100),
        (60, "q.retry.60s", 60000),
        (2.0, "q.retry.2s", 2000),
        (0.0015, "q.retry.2ms", 2),
    ],
)
def test_delay_queues_are_named_by_their_delay_and_hold_it_in_milliseconds(delay, name, ttl):
    assert delay_queue_name("q", delay) == name
    described = describe(exchange="e", binding_key="k", queue="q", retry_delays=(delay,))
    (spec,) = described.delays
    assert (spec.name, spec.arguments["x-message-ttl"]) == (name, ttl)
    assert isinstance(spec.arguments["x-message-ttl"], int)


def test_delay_queues_are_ordered_shortest_first():
    described = topology(retry_delays=(30, 1, 5))
    ttls = [q.arguments["x-message-ttl"] for q in described.delays]
    assert ttls == [1000, 5000, 30000]


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("class_name", "expected"),
    [
        ("FileCopier", "file_copier"),
        ("HTTPCallback", "http_callback"),
        ("Copier", "copier"),
        ("copier", "copier"),
        ("S3Uploader", "s3_uploader"),
        ("OrderV2Handler", "order_v2_handler"),
        ("XMLHTTPRequest", "xmlhttp_request"),
        ("ParseJSON", "parse_json"),
        ("A", "a"),
        ("already_snake", "already_snake"),
    ],
)
def test_class_names_become_snake_case(class_name, expected):
    assert snake_case(class_name) == expected


def test_the_default_queue_name_has_the_prefix_in_front():
    assert default_queue_name("FileCopier") == "file_copier"
    assert default_queue_name("FileCopier", "") == "file_copier"
    assert default_queue_name("FileCopier", "billing") == "billing.file_copier"
