"""The one back-off of start-up retries, reconnects and restarts."""

from __future__ import annotations

from listener.runner.backoff import Backoff


def test_delays_double_from_the_first_up_to_the_cap_within_their_jitter():
    backoff = Backoff(0.5, 4.0, jitter=(0.8, 1.2))
    waits = [backoff.next() for _ in range(6)]
    for wait, base in zip(waits, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0], strict=True):
        assert 0.8 * base <= wait <= min(1.2 * base, 4.0)


def test_a_wait_never_exceeds_the_cap_even_with_jitter_above_one():
    backoff = Backoff(1.0, 2.0, jitter=(1.5, 1.5))
    assert [backoff.next() for _ in range(3)] == [1.5, 2.0, 2.0]


def test_a_reset_starts_over_from_the_first_delay():
    backoff = Backoff(1.0, 8.0, jitter=(1.0, 1.0))
    assert [backoff.next() for _ in range(3)] == [1.0, 2.0, 4.0]
    backoff.reset()
    assert backoff.next() == 1.0
