"""The circuit breaker of one upstream endpoint: the *policy* that decides its state.

Linkerd's split: a classifier elsewhere (the proxy) says whether a call failed and why;
this class turns those verdicts into a state; the request path only asks `allow(now)`,
which in CLOSED is one attribute check. Everything that changes the state lives here,
in the four `_to_*` methods at the bottom of the class; the table below is the whole
machine.

    state       event                                        next
    CLOSED      record(False): `failures` in `window_s`      OPEN       trips += 1
    OPEN        allow() once `open_s` has elapsed            HALF_OPEN
    HALF_OPEN   record(True): `successes` reached            CLOSED     window cleared
    HALF_OPEN   record(False)                                OPEN       trips += 1
    any         force_open()                                 OPEN       held (no half-open)
    any         force_close()                                CLOSED     held (failures ignored)
    any         reset()                                      CLOSED     automatic again

Time is an argument (`now`, monotonic seconds); nothing here reads a clock, sleeps or
logs. A failure at time t is in the window at `now` while `now - t < window_s`.

Every call that `allow()` admits must be followed by exactly one `record()` or
`release()`: in HALF_OPEN that is how probe slots are given back. A verdict that arrives
while OPEN (a call admitted before the trip) is dropped, and so is one that arrives in
HALF_OPEN when no probe is in flight (it belongs to an earlier period).
"""

from __future__ import annotations

import enum
from collections import deque

from sidecar.config import BreakerSettings


class BreakerState(enum.Enum):
    CLOSED = "closed"  # calls pass; failures are counted
    OPEN = "open"  # calls are refused until open_s has elapsed
    HALF_OPEN = "half_open"  # up to `probes` calls at once test the upstream


class Breaker:
    __slots__ = (
        # fixed
        "name", "settings",
        # lifetime totals (kept by reset)
        "trips", "rejections",
        # the current state
        "_state", "closed", "_forced",
        # the current episode
        "_failures", "_opened_at", "tripped_at", "trip_reason", "_successes", "_probes",
    )

    def __init__(self, name: str, settings: BreakerSettings):
        self.name = name
        self.settings = settings
        self.trips = 0  # times it opened (automatic or forced)
        self.rejections = 0  # calls refused: open, or half-open slots full
        self._state = BreakerState.CLOSED
        # Mirrors `_state is CLOSED`, for the hot path to read (never to set): while it
        # is True, allow() admits and record(True) changes nothing, so a caller may
        # skip both calls.
        self.closed = True
        self._forced: str | None = None  # None | "open" | "closed"
        # Only the last `failures` failure times matter: the breaker trips when the oldest
        # of them is still in the window. Bounded, O(1) per failure.
        self._failures: deque[float] = deque(maxlen=settings.failures)
        self._opened_at = 0.0
        self.tripped_at: float | None = None  # monotonic time of the last trip
        self.trip_reason: str | None = None
        self._successes = 0  # successful probes in this half-open period
        self._probes = 0  # probes admitted and not yet answered

    # --- the request path ----------------------------------------------------------

    def allow(self, now: float) -> bool:
        """May a call pass now? Counts a rejection when not."""
        if self.closed:
            return True
        if self._state is BreakerState.OPEN:
            if self._forced is not None or now - self._opened_at < self.settings.open_s:
                self.rejections += 1
                return False
            self._to_half_open()
        if self._probes < self.settings.probes:
            self._probes += 1
            return True
        self.rejections += 1
        return False

    def record(self, ok: bool, now: float, reason: str = "") -> None:
        """The verdict of an admitted call; `reason` says why it failed."""
        if ok and self.closed:
            return
        state = self._state
        if state is BreakerState.CLOSED:
            if self._forced is not None:
                return
            failures = self._failures
            failures.append(now)
            s = self.settings
            if len(failures) == s.failures and now - failures[0] < s.window_s:
                summary = f"{s.failures} failures in {s.window_s:g} s"
                self._to_open(now, f"{summary}, last: {reason}" if reason else summary)
        elif state is BreakerState.HALF_OPEN:
            if self._probes == 0:
                return  # admitted before this half-open period began
            self._probes -= 1
            if not ok:
                self._to_open(now, f"probe failed: {reason or 'failure'}")
                return
            self._successes += 1
            if self._successes >= self.settings.successes:
                self._to_closed()
        # OPEN: a call admitted before the trip; its verdict changes nothing.

    def release(self) -> None:
        """An admitted call ended with no verdict (the agent went away)."""
        if self._state is BreakerState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    # --- reading -------------------------------------------------------------------

    def state_at(self, now: float) -> BreakerState:
        """The state as a caller at `now` would find it: OPEN reads as HALF_OPEN once
        open_s has elapsed (unless forced). No side effects."""
        state = self._state
        if (state is BreakerState.OPEN and self._forced is None
                and now - self._opened_at >= self.settings.open_s):
            return BreakerState.HALF_OPEN
        return state

    def failures_in_window(self, now: float) -> int:
        window_s = self.settings.window_s
        return sum(1 for t in self._failures if now - t < window_s)

    def snapshot(self, now: float) -> dict:
        """Everything `agentvisor status` shows about this breaker. `tripped_at` and
        `trip_reason` describe the last trip and outlive it until reset()."""
        state = self.state_at(now)
        remaining = None
        if state is BreakerState.OPEN and self._forced is None:
            remaining = max(0.0, self._opened_at + self.settings.open_s - now)
        return {
            "name": self.name,
            "state": state.value,
            "forced": self._forced,
            "failures_in_window": self.failures_in_window(now),
            "trips": self.trips,
            "rejections": self.rejections,
            "tripped_at": self.tripped_at,
            "trip_reason": self.trip_reason,
            "open_remaining_s": remaining,
            "probes_in_flight": self._probes if state is BreakerState.HALF_OPEN else 0,
        }

    # --- operator overrides --------------------------------------------------------

    def force_open(self, now: float, reason: str = "opened by operator") -> None:
        """Refuse every call until force_close() or reset(); no half-open probing."""
        if self.state_at(now) is not BreakerState.OPEN:
            self._to_open(now, reason)  # counts a trip
        else:  # already open: holding it is not another trip
            self.trip_reason = reason
        self._forced = "open"

    def force_close(self, now: float) -> None:
        """Pass every call and ignore failures until reset(): for emergencies, when the
        breaker is wrong about the upstream."""
        self._to_closed()
        self._forced = "closed"

    def reset(self, now: float) -> None:
        """Back to automatic CLOSED with a fresh episode; trips and rejections are kept."""
        self._to_closed()
        self.tripped_at = None
        self.trip_reason = None

    # --- transitions: the only places that change the state ------------------------

    def _to_open(self, now: float, reason: str) -> None:
        self._state = BreakerState.OPEN
        self.closed = False
        self._forced = None
        self._opened_at = now
        self.tripped_at = now
        self.trip_reason = reason
        self.trips += 1
        self._successes = 0
        self._probes = 0

    def _to_half_open(self) -> None:
        self._state = BreakerState.HALF_OPEN
        self.closed = False
        self._successes = 0
        self._probes = 0

    def _to_closed(self) -> None:
        self._state = BreakerState.CLOSED
        self.closed = True
        self._forced = None
        self._failures.clear()
        self._successes = 0
        self._probes = 0

    def __repr__(self) -> str:
        forced = f", forced {self._forced}" if self._forced else ""
        return f"<Breaker {self.name} {self._state.value}{forced} trips={self.trips}>"
