"""The outcome of one attempt (pure code): the contract's outcome table, counters, headers."""

from __future__ import annotations

import datetime as dt

import pydantic
import pytest

from listener import delay
from listener.errors import Reject, Retry
from listener.outcome import (
    ATTEMPTS_HEADER,
    Ack,
    Failure,
    Park,
    RetryLater,
    attempt_number,
    attempts_made,
    carried_headers,
    copy_headers,
    decide,
    delay_before,
    deliveries_lost,
    failure_from,
    failure_headers,
)

DELAYS = (1.0, 5.0, 30.0)
MAX = 5
QUEUE = "jobs"
DEAD = "jobs.dead"


class CustomProblem(Exception):
    """An application exception, defined outside builtins."""


class Secretive(pydantic.BaseModel):
    api_key: int


def failure(kind: str, *, delay: float | None = None, reason: str = "") -> Failure:
    return Failure(kind, "ValueError", "boom", delay=delay, reason=reason)  # type: ignore[arg-type]


# -- the contract's outcome table ----------------------------------------------------------

OUTCOME_TABLE = [
    # decode failures: parked at once, whatever the attempt
    (
        "decode failure: unsupported type",
        failure("decode", reason="unsupported_content_type"),
        1,
        Park("unsupported_content_type", 1, DEAD),
    ),
    (
        "decode failure: not JSON",
        failure("decode", reason="decode_error"),
        1,
        Park("decode_error", 1, DEAD),
    ),
    (
        "decode failure: model mismatch",
        failure("decode", reason="validation_error"),
        1,
        Park("validation_error", 1, DEAD),
    ),
    (
        "decode failure: too large",
        failure("decode", reason="too_large"),
        2,
        Park("too_large", 2, DEAD),
    ),
    # the worker died mid-message too often
    ("worker lost", failure("lost"), 3, Park("worker_lost", 3, DEAD)),
    ("worker lost on the first attempt", failure("lost"), 1, Park("worker_lost", 1, DEAD)),
    # Reject: parked at once, no retries
    ("reject on attempt 1 of 5", failure("reject"), 1, Park("rejected", 1, DEAD)),
    ("reject on the last attempt", failure("reject"), MAX, Park("rejected", MAX, DEAD)),
    # handle raises
    ("error on attempt 1 of 5", failure("error"), 1, RetryLater(1.0, 1, "jobs.retry.1s")),
    ("error on attempt 3 of 5", failure("error"), 3, RetryLater(30.0, 3, "jobs.retry.30s")),
    ("error on attempt 4 of 5", failure("error"), 4, RetryLater(30.0, 4, "jobs.retry.30s")),
    ("error on the last attempt", failure("error"), MAX, Park("failed", MAX, DEAD)),
    ("error beyond the last attempt", failure("error"), MAX + 3, Park("failed", MAX + 3, DEAD)),
    # the attempt outlives `timeout`
    ("timeout on attempt 1 of 5", failure("timeout"), 1, RetryLater(1.0, 1, "jobs.retry.1s")),
    ("timeout on attempt 2 of 5", failure("timeout"), 2, RetryLater(5.0, 2, "jobs.retry.5s")),
    ("timeout on the last attempt", failure("timeout"), MAX, Park("timeout", MAX, DEAD)),
    # raise Retry(delay=...)
    (
        "Retry(delay=7) on attempt 1",
        failure("retry", delay=7),
        1,
        RetryLater(7.0, 1, "amqp-listener.delay.05", steps=56, to="jobs"),
    ),
    ("Retry(delay=0) on attempt 2", failure("retry", delay=0), 2, RetryLater(0.0, 2, QUEUE)),
    (
        "Retry(delay=7) on the last attempt",
        failure("retry", delay=7),
        MAX,
        Park("failed", MAX, DEAD),
    ),
    ("Retry() without a delay", failure("retry"), 2, RetryLater(5.0, 2, "jobs.retry.5s")),
    # handle returned
    ("success", None, 1, Ack()),
    ("success on the last attempt", None, MAX, Ack()),
]


@pytest.mark.parametrize(
    ("failure_", "attempt", "expected"),
    [row[1:] for row in OUTCOME_TABLE],
    ids=[row[0] for row in OUTCOME_TABLE],
)
def test_each_attempt_result_maps_to_the_contract_outcome(failure_, attempt, expected):
    assert (
        decide(failure_, attempt=attempt, max_attempts=MAX, retry_delays=DELAYS, queue=QUEUE)
        == expected
    )


def test_a_single_attempt_listener_parks_on_the_first_failure():
    decision = decide(failure("error"), attempt=1, max_attempts=1, retry_delays=DELAYS, queue=QUEUE)
    assert decision == Park("failed", 1, DEAD)


def test_retry_without_delay_uses_the_listeners_own_delays():
    decision = decide(
        failure("retry"), attempt=1, max_attempts=3, retry_delays=(0.25, 9), queue=QUEUE
    )
    assert decision == RetryLater(0.25, 1, "jobs.retry.250ms")


def test_retry_delays_of_zero_retry_at_once():
    decision = decide(failure("error"), attempt=1, max_attempts=3, retry_delays=(), queue=QUEUE)
    assert decision == RetryLater(0.0, 1, QUEUE)


@pytest.mark.parametrize(
    ("asked", "queue", "delay", "steps"),
    [
        (0.05, "amqp-listener.delay.00", 0.125, 1),  # never early: a whole step
        (0.3, "amqp-listener.delay.01", 0.375, 3),
        (7, "amqp-listener.delay.05", 7.0, 56),
        (5, "jobs.retry.5s", 5.0, 0),  # a delay of retry_delays has a queue of its own
        (0, "jobs", 0.0, 0),
    ],
)
def test_a_retry_goes_to_the_queue_that_holds_it_for_its_tiered_delay(asked, queue, delay, steps):
    decision = decide(
        failure("retry", delay=asked), attempt=1, max_attempts=3, retry_delays=DELAYS, queue=QUEUE
    )
    # Through the shared delay levels, the copy is routed back to the listener's queue.
    assert decision == RetryLater(delay, 1, queue, steps, "jobs" if steps else "")


def test_the_copy_of_a_retry_through_the_delay_levels_carries_its_route_and_due_time():
    decision = RetryLater(7.0, 1, "amqp-listener.delay.05", 56, "jobs")
    headers = copy_headers(
        decision,
        failure("retry", delay=7),
        carried={"x-original-exchange": "jobs"},
        previous=None,
        listener="app:Jobs",
        host="h",
        pid=1,
        now=NOW,
    )
    assert headers["CC"] == [delay.bits_key(56), delay.target_key("jobs")]
    assert headers["x-due-at"] == (NOW + dt.timedelta(seconds=7)).isoformat()
    assert "x-parked-reason" not in headers


def test_the_copy_of_a_parked_message_says_why_and_has_no_route():
    headers = copy_headers(
        Park("rejected", 2, DEAD),
        Failure("reject", "listener.Reject", "no", reason="bad input"),
        carried={"CC": ["stale"]}
        | carried_headers(
            {"x-delivery-count": 3, "CC": ["0.1"], "x-due-at": "x", "k": "v"},
            exchange="jobs",
            routing_key="run",
        ),
        previous=None,
        listener="app:Jobs",
        host="h",
        pid=1,
        now=NOW,
    )
    assert headers["x-parked-reason"] == "rejected"
    assert headers["x-exception-message"] == "bad input"
    assert headers["k"] == "v"
    assert "x-delivery-count" not in headers and "x-due-at" not in headers


@pytest.mark.parametrize(
    ("headers", "deaths", "expected"),
    [
        ({}, 0, (1, None)),
        ({ATTEMPTS_HEADER: 2}, 0, (3, None)),
        ({ATTEMPTS_HEADER: 1}, 1, (3, None)),
    ],
)
def test_the_attempt_number_counts_failed_attempts_and_blamed_deaths(headers, deaths, expected):
    assert attempt_number(headers, 5, deaths=deaths) == expected


def test_deaths_that_use_up_the_attempts_park_the_message_as_lost():
    attempt, lost = attempt_number({ATTEMPTS_HEADER: 1}, 3, deaths=2)
    assert attempt == 3 and lost is not None and lost.kind == "lost"


def test_a_delivery_at_the_delivery_limit_parks_as_undelivered():
    _attempt, lost = attempt_number({"x-delivery-count": 4}, 5, delivery_limit=4)
    assert lost is not None and lost.kind == "undelivered"
    assert "max_deliveries=4" in lost.message


def test_retry_and_reject_raised_by_handle_are_outcomes_and_anything_else_a_failure():
    assert failure_from(Retry(delay=3)).kind == "retry"
    assert failure_from(Retry(delay=3)).delay == 3
    assert failure_from(Reject("nope")).reason == "nope"
    assert failure_from(LookupError("x")).kind == "error"


# -- delay_before --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"), [(2, 1.0), (3, 5.0), (4, 30.0), (5, 30.0), (6, 30.0)]
)
def test_the_last_retry_delay_repeats(attempt, expected):
    assert delay_before(attempt, (1, 5, 30)) == expected


@pytest.mark.parametrize("attempt", [2, 3, 10])
def test_no_retry_delays_means_no_wait(attempt):
    assert delay_before(attempt, ()) == 0.0


def test_the_first_attempt_never_waits():
    assert delay_before(1, (1, 5, 30)) == 0.0


def test_delay_before_returns_floats():
    assert isinstance(delay_before(2, (3,)), float)


# -- forgery-safe counters -----------------------------------------------------------------

FORGED = [
    None,
    "abc",
    "3",
    -1,
    True,
    False,
    1.5,
    b"2",
    [1],
    {"n": 1},
]


@pytest.mark.parametrize("value", FORGED, ids=repr)
def test_a_corrupt_attempts_header_reads_as_zero(value):
    assert attempts_made({ATTEMPTS_HEADER: value}) == 0


@pytest.mark.parametrize("value", FORGED, ids=repr)
def test_a_corrupt_delivery_count_reads_as_zero(value):
    assert deliveries_lost({"x-delivery-count": value}) == 0


@pytest.mark.parametrize("headers", [None, {}, {"other": 3}])
def test_missing_counters_read_as_zero(headers):
    assert attempts_made(headers) == 0
    assert deliveries_lost(headers) == 0


def test_valid_counters_are_read_as_they_are():
    headers = {ATTEMPTS_HEADER: 3, "x-delivery-count": 2}
    assert attempts_made(headers) == 3
    assert deliveries_lost(headers) == 2


@pytest.mark.parametrize("value", [10**12, 2**63 - 1, 10**100])
def test_a_huge_counter_is_clamped_and_still_parks(value):
    made = attempts_made({ATTEMPTS_HEADER: value})
    lost = deliveries_lost({"x-delivery-count": value})
    assert 0 < made <= 1_000_000
    assert 0 < lost <= 1_000_000
    decision = decide(
        failure("error"), attempt=made + 1, max_attempts=MAX, retry_delays=DELAYS, queue=QUEUE
    )
    assert isinstance(decision, Park)


# -- failure headers -----------------------------------------------------------------------

NOW = dt.datetime(2024, 6, 1, 12, 30, 45, 123456, tzinfo=dt.UTC)


def _headers(previous=None, *, fail=None, now=NOW):
    return failure_headers(
        fail or Failure("error", "ValueError", "boom", "Traceback...\nValueError: boom\n"),
        attempts=2,
        previous=previous,
        listener="app.listeners:FileCopier",
        host="worker-1",
        pid=4321,
        now=now,
    )


def test_failure_headers_say_what_failed_how_and_where():
    headers = _headers()
    assert headers == {
        "x-attempts": 2,
        "x-exception-type": "ValueError",
        "x-exception-message": "boom",
        "x-exception-traceback": "Traceback...\nValueError: boom\n",
        "x-listener": "app.listeners:FileCopier",
        "x-host": "worker-1",
        "x-pid": 4321,
        "x-first-failure-at": "2024-06-01T12:30:45.123+00:00",
        "x-last-failure-at": "2024-06-01T12:30:45.123+00:00",
    }
    assert isinstance(headers["x-attempts"], int)
    assert isinstance(headers["x-pid"], int)
    assert all(isinstance(headers[k], str) for k in headers if k not in ("x-attempts", "x-pid"))


def test_the_first_failure_time_is_kept_from_the_previous_headers():
    earlier = "2024-05-31T08:00:00.000+00:00"
    headers = _headers({"x-first-failure-at": earlier, "x-last-failure-at": earlier})
    assert headers["x-first-failure-at"] == earlier
    assert headers["x-last-failure-at"] == "2024-06-01T12:30:45.123+00:00"


@pytest.mark.parametrize("forged", [None, 17, b"2024", ["x"]], ids=repr)
def test_a_non_text_first_failure_time_is_replaced_by_now(forged):
    headers = _headers({"x-first-failure-at": forged})
    assert headers["x-first-failure-at"] == "2024-06-01T12:30:45.123+00:00"


def test_failure_times_are_written_in_utc_whatever_the_local_zone():
    local = NOW.astimezone(dt.timezone(dt.timedelta(hours=-5)))
    headers = _headers(now=local)
    assert headers["x-last-failure-at"] == "2024-06-01T12:30:45.123+00:00"
    assert dt.datetime.fromisoformat(headers["x-last-failure-at"]) == NOW.replace(
        microsecond=123000
    )


def test_no_traceback_header_is_written_without_a_traceback():
    headers = _headers(fail=Failure("reject", "listener.errors.Reject", "nope"))
    assert "x-exception-traceback" not in headers
    assert headers["x-exception-type"] == "listener.errors.Reject"


# -- Failure.from_exception ----------------------------------------------------------------


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_a_builtin_exception_is_named_without_a_module():
    described = Failure.from_exception("error", _raised(ValueError("bad value")))
    assert described.kind == "error"
    assert described.exception_type == "ValueError"
    assert described.message == "bad value"
    assert "Traceback (most recent call last)" in described.traceback
    assert described.traceback.rstrip().endswith("ValueError: bad value")


def test_an_application_exception_is_named_with_its_module():
    described = Failure.from_exception("error", _raised(CustomProblem("disk full")))
    assert described.exception_type == f"{CustomProblem.__module__}.CustomProblem"
    assert "." in described.exception_type


def test_framework_exceptions_keep_their_delay_and_reason():
    retried = Failure.from_exception("retry", _raised(Retry(delay=3)), delay=3)
    rejected = Failure.from_exception("reject", _raised(Reject("bad input")), reason="rejected")
    assert (retried.exception_type, retried.delay) == ("listener.errors.Retry", 3)
    assert (rejected.exception_type, rejected.message, rejected.reason) == (
        "listener.errors.Reject",
        "bad input",
        "rejected",
    )


def _ping(depth: int) -> None:
    if depth == 0:
        raise RuntimeError("bottom of the stack")
    _pong(depth - 1)


def _pong(depth: int) -> None:
    _ping(depth - 1)


def test_a_deep_traceback_is_clipped_keeping_its_innermost_end():
    # Alternating frames are not folded into "[Previous line repeated]" by traceback.
    described = Failure.from_exception("error", _raised_from(lambda: _ping(400)))
    assert len(described.traceback) <= 8000
    assert described.traceback.startswith("...")
    assert described.traceback.rstrip().endswith("RuntimeError: bottom of the stack")


def _raised_from(call) -> BaseException:
    try:
        call()
    except BaseException as caught:
        return caught
    raise AssertionError("did not raise")


def test_a_recursion_error_is_described_within_the_limits():
    def dive(n: int) -> int:
        return dive(n + 1) + 1

    described = Failure.from_exception("error", _raised_from(lambda: dive(0)))
    assert described.exception_type == "RecursionError"
    assert 0 < len(described.traceback) <= 8000
    assert "RecursionError" in described.traceback


def test_a_long_exception_message_is_clipped():
    described = Failure.from_exception("error", _raised(ValueError("x" * 50_000)))
    assert len(described.message) <= 1000
    assert described.message.startswith("xxx")
    assert len(described.traceback) <= 8000


def test_a_validation_error_never_carries_the_input_value():
    payload = {"api_key": "s3cr3t-value"}
    error = _raised_from(lambda: Secretive.model_validate(payload))
    assert isinstance(error, pydantic.ValidationError)
    assert "s3cr3t-value" in str(error)  # pydantic itself repeats the input
    described = Failure.from_exception("decode", error, reason="validation_error")
    assert "s3cr3t-value" not in described.message
    assert "s3cr3t-value" not in described.traceback
    assert "api_key" in described.message
    assert "api_key" in described.traceback
    assert described.exception_type.endswith(".ValidationError")
