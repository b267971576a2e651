"""Which failures may be retried, and the retry budget, with plain numbers for time."""

import pytest

from sidecar.config import RetrySettings
from sidecar.policy.retry import IDEMPOTENT_METHODS, RetryBudget, may_retry

SEED = RetrySettings()  # 1 retry, 20 % of requests + 10/s over 10 s


def drain(budget: RetryBudget, now: float) -> int:
    """How many retries the budget lets through at `now` (withdrawing them)."""
    n = 0
    while budget.withdraw(now):
        n += 1
        assert n < 100_000
    return n


@pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
def test_idempotent_methods_may_retry_a_failure_before_the_response(method):
    assert may_retry(method, True, 1, SEED)


@pytest.mark.parametrize("method", [b"POST", b"PATCH", b"CONNECT", b"get"])
def test_other_methods_are_never_retried(method):
    assert not may_retry(method, True, 1, SEED)


def test_a_failure_after_response_bytes_is_never_retried():
    assert not may_retry(b"GET", False, 1, SEED)


def test_attempts_limit_the_retry_number():
    assert may_retry(b"GET", True, 1, SEED)
    assert not may_retry(b"GET", True, 2, SEED)
    three = RetrySettings(attempts=3)
    assert [may_retry(b"PUT", True, n, three) for n in (1, 2, 3, 4)] == [True] * 3 + [False]
    assert not may_retry(b"GET", True, 1, RetrySettings(attempts=0))


def test_budget_is_ratio_of_requests_without_a_floor():
    b = RetryBudget(RetrySettings(budget_ratio=0.2, min_per_s=0.0, window_s=10.0))
    assert not b.withdraw(0.0)  # no requests, no retries
    for _ in range(50):
        b.deposit(1.0)
    assert b.available(1.0) == 10
    assert drain(b, 1.0) == 10
    for _ in range(5):  # one more retry per 5 requests
        b.deposit(2.0)
    assert drain(b, 2.0) == 1


def test_budget_never_exceeds_the_ratio_on_fractions():
    b = RetryBudget(RetrySettings(budget_ratio=0.2, min_per_s=0.0, window_s=10.0))
    for _ in range(7):
        b.deposit(0.0)
    assert drain(b, 0.0) == 1  # 1.4 allowed: one, not two
    b = RetryBudget(RetrySettings(budget_ratio=0.2, min_per_s=0.0, window_s=10.0))
    for _ in range(15):
        b.deposit(0.0)
    assert drain(b, 0.0) == 3  # 0.2 * 15 is 3.0000000000000004 in floats


def test_budget_floor_lets_a_quiet_upstream_retry():
    # seed: 10/s over 10 s is 100 retries with no requests at all
    b = RetryBudget(SEED)
    assert drain(b, 5.0) == 100
    for _ in range(100):
        b.deposit(5.0)
    assert drain(b, 5.0) == 20  # the ratio comes on top of the floor


def test_budget_window_expiry():
    s = RetrySettings(budget_ratio=0.5, min_per_s=0.0, window_s=10.0)  # 1 s buckets
    b = RetryBudget(s)
    for _ in range(10):
        b.deposit(100.0)
    assert drain(b, 100.0) == 5
    assert not b.withdraw(109.9)  # retries and requests both still in the window
    # at 110 the bucket of t=100 has left the window: requests and retries with it
    assert not b.withdraw(110.0)
    for _ in range(4):
        b.deposit(110.0)
    assert drain(b, 110.0) == 2


def test_budget_retries_leave_the_window_with_their_requests():
    s = RetrySettings(budget_ratio=0.5, min_per_s=0.0, window_s=10.0)
    b = RetryBudget(s)
    for _ in range(10):
        b.deposit(0.0)
    assert drain(b, 0.0) == 5
    for _ in range(10):
        b.deposit(5.0)
    # 20 requests in the window, 5 retries already spent
    assert drain(b, 5.0) == 5
    # at 10 the first requests and their retries expire; the later ones remain
    assert b.available(10.0) == 0
    for _ in range(2):
        b.deposit(10.0)
    assert drain(b, 10.0) == 1


def test_budget_after_a_long_idle_gap_starts_empty():
    s = RetrySettings(budget_ratio=1.0, min_per_s=0.0, window_s=10.0)
    b = RetryBudget(s)
    for _ in range(1000):
        b.deposit(0.0)
    assert b.withdraw(0.0)
    assert b.available(1e6) == 0
    b.deposit(1e6)
    assert drain(b, 1e6) == 1
