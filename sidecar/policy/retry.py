"""When a failed call may be tried again, and how many retries an upstream may see.

Two separate questions. `may_retry` is about safety: only a request that can be sent
twice without harm (an idempotent method) and only a failure before any response byte
(refused, reset, connect timeout), so the agent never sees half of one response and
half of another. `RetryBudget` is about load (Linkerd's and Envoy's retry budgets):
retries may be at most `budget_ratio` of the requests of the last `window_s`, plus a
floor of `min_per_s * window_s` so a quiet upstream can still be retried. A failing
upstream therefore sees at most (1 + budget_ratio) times its traffic plus that floor,
never a retry storm.

Pure: time comes in as `now` (monotonic seconds).
"""

from __future__ import annotations

from typing import Final

from sidecar.config import RetrySettings

# RFC 9110 9.2.2: the methods whose repetition has the same effect as one request.
# POST and PATCH are not: a reset after the upstream read the request may have acted.
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# The window is kept as this many time buckets: O(1) per call and a few dozen bytes per
# upstream, at the price of a window that is exact only to one bucket (window_s / 10).
BUDGET_BUCKETS: Final = 10

# Float products such as 0.2 * 15 land a hair above or below the integer they mean.
_EPSILON: Final = 1e-9


def may_retry(method: bytes, failure_before_response: bool, attempt: int,
              settings: RetrySettings) -> bool:
    """May retry number `attempt` (1 for the first retry) of this request go?
    Says nothing about the budget: ask `RetryBudget.withdraw` after this."""
    return (failure_before_response and attempt <= settings.attempts
            and method in IDEMPOTENT_METHODS)


class RetryBudget:
    """Requests and retries of the last `window_s`, in `BUDGET_BUCKETS` time buckets.

    An event at time t counts while its bucket is one of the last BUDGET_BUCKETS
    (the current one included): it leaves the window between window_s - window_s/10
    and window_s seconds after it happened."""

    __slots__ = ("settings", "_bucket_s", "_reserve", "_current", "_deposits",
                 "_withdrawals", "_deposited", "_withdrawn", "_current_deposits",
                 "_current_withdrawals", "_current_from", "_current_until")

    def __init__(self, settings: RetrySettings):
        self.settings = settings
        self._bucket_s = settings.window_s / BUDGET_BUCKETS
        self._reserve = settings.min_per_s * settings.window_s + _EPSILON
        self._current = 0  # absolute index (now // bucket_s) of the newest bucket
        # The older buckets' counts, by index % BUDGET_BUCKETS. The newest bucket's are
        # the two integers below (written into the lists when it is no longer newest):
        # one request deposits, and an integer's += is native where a list item's is a
        # generic add on boxed ints.
        self._deposits = [0] * BUDGET_BUCKETS
        self._withdrawals = [0] * BUDGET_BUCKETS
        self._current_deposits = 0
        self._current_withdrawals = 0
        # Where the newest bucket begins and ends: within it, no division is needed to
        # find the bucket (a float floor division is a libm call).
        self._current_from = 0.0
        self._current_until = self._bucket_s
        self._deposited = 0  # sums over the window, kept so a check is O(1)
        self._withdrawn = 0

    def deposit(self, now: float) -> None:
        """An original request (not a retry) was sent."""
        if now >= self._current_until or now < self._current_from:
            self._advance(int(now // self._bucket_s))
        self._current_deposits += 1
        self._deposited += 1

    def withdraw(self, now: float) -> bool:
        """A retry wants to go: True, and counted, if the budget allows it."""
        if now >= self._current_until or now < self._current_from:
            self._advance(int(now // self._bucket_s))
        allowed = self.settings.budget_ratio * self._deposited + self._reserve
        if self._withdrawn + 1 > allowed:
            return False
        self._current_withdrawals += 1
        self._withdrawn += 1
        return True

    def available(self, now: float) -> int:
        """Retries the budget would allow now (for status output and tests)."""
        self._advance(int(now // self._bucket_s))
        allowed = self.settings.budget_ratio * self._deposited + self._reserve
        return max(0, int(allowed) - self._withdrawn)

    def _advance(self, i: int) -> None:
        """Move the window so that bucket `i` is the newest. A bucket at or before the
        newest (a clock read that raced behind, or a float boundary read both ways)
        counts in the newest."""
        current = self._current
        if i <= current:
            return
        slot = current % BUDGET_BUCKETS
        self._deposits[slot] = self._current_deposits
        self._withdrawals[slot] = self._current_withdrawals
        for j in range(current + 1, current + 1 + min(i - current, BUDGET_BUCKETS)):
            k = j % BUDGET_BUCKETS
            self._deposited -= self._deposits[k]
            self._withdrawn -= self._withdrawals[k]
            self._deposits[k] = 0
            self._withdrawals[k] = 0
        self._current = i
        self._current_deposits = 0
        self._current_withdrawals = 0
        self._current_from = i * self._bucket_s
        self._current_until = (i + 1) * self._bucket_s
