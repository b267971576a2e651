"""Restart policy for one agent: after an unplanned exit, restart (and how soon), leave
it, or give up as FATAL.

The one idea: two independent counters. The *attempt* counter sets the backoff delay and
is reset by any run that lasted `start_s`; the *window* counts every restart-worthy exit
by wall-clock time, whatever the run length, so a crash loop becomes FATAL even with
`start_s = 0` (supervisord's `startsecs=0` crash loop never does).

FATAL rule (supervisord's `startretries`): `max_failures` restarts are allowed within any
`window_s`; the exit that brings the count of exits in the last `window_s` seconds to
`max_failures + 1` is FATAL. An exit at time t is in the window at `now` while
`now - t < window_s`. With the defaults (5 in 60 s): exits 1..5 restart, the 6th FATAL.

Pure: time comes in as `now`, randomness from an injected `random.Random`.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass

from supervisor.config.model import RestartMode, RestartPolicy


class Action(enum.Enum):
    RESTART = "restart"  # spawn again after delay_s
    EXIT = "exit"  # the policy says leave it: EXITED
    FATAL = "fatal"  # too many exits in the window: FATAL


@dataclass(frozen=True)
class RestartDecision:
    action: Action
    delay_s: float  # RESTART only: wait this long (0.0 = immediately)
    attempt: int  # 1 for the first restart after a good run; 0 for EXIT
    reason: str  # for the operator, e.g. "exited with status 1; restart 3 in 1.0 s"


class RestartTracker:
    def __init__(self, policy: RestartPolicy, rng: random.Random | None = None):
        self.policy = policy
        self._rng = rng if rng is not None else random.Random()
        self._exits: deque[float] = deque()  # times of counted exits, oldest first
        self._attempt = 0

    def on_exit(
        self, now: float, ran_s: float, failed: bool, description: str
    ) -> RestartDecision:
        """Decide what follows an unplanned exit at `now` after a run of `ran_s` seconds.
        `description` says how it went, e.g. "exited with status 1"."""
        p = self.policy
        if p.mode is RestartMode.NEVER or (p.mode is RestartMode.ON_FAILURE and not failed):
            reason = f"{description}; restart {p.mode.value}: not restarting"
            return RestartDecision(Action.EXIT, 0.0, 0, reason)

        self._exits.append(now)
        self._attempt = 1 if ran_s >= p.start_s else self._attempt + 1
        count = self.failures(now)
        if count > p.max_failures:
            reason = (
                f"{description}; {count} exits in {p.window_s:g} s"
                f" (max_failures {p.max_failures}): FATAL"
            )
            return RestartDecision(Action.FATAL, 0.0, self._attempt, reason)
        delay_s = self.delay(self._attempt)
        reason = f"{description}; restart {self._attempt} in {delay_s:.1f} s"
        return RestartDecision(Action.RESTART, delay_s, self._attempt, reason)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number `attempt`: 0 for the first, then
        initial_s * factor**(attempt-2) capped at max_s, with +-jitter so agents that
        failed together do not restart in lockstep."""
        if attempt <= 1:
            return 0.0
        b = self.policy.backoff
        try:
            base = min(b.max_s, b.initial_s * b.factor ** (attempt - 2))
        except OverflowError:  # a slow crasher that never goes FATAL keeps counting up
            base = b.max_s
        if b.jitter > 0:
            base *= self._rng.uniform(1 - b.jitter, 1 + b.jitter)
        return min(max(base, 0.0), b.max_s * (1 + b.jitter))

    def failures(self, now: float) -> int:
        """Counted exits within the last window_s seconds at `now`."""
        while self._exits and now - self._exits[0] >= self.policy.window_s:
            self._exits.popleft()
        return len(self._exits)

    def reset(self) -> None:
        """An operator `start`: forget the FATAL history and the backoff."""
        self._exits.clear()
        self._attempt = 0
