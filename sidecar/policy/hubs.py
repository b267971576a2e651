"""Hub choice: which of a host's hubs, nearest first, gets the next batch of metrics.

A host forwards its spool to an ordered list of hub receivers (PC2: edge then central;
MainPC: central then edge). The one idea: send to the nearest hub believed up; leave a
hub on its first failure, for the next one at once; try a failed hub again no sooner than
`retry_s` later (or its own `Retry-After`); and take the nearest back the moment a probe
of it succeeds. With every hub down the host is *partitioned*: it only spools, and the
next attempt is the earliest retry.

    hub state           event                              next
    UNKNOWN, UP         failed(hub, now, reason)           DOWN since now, retry at
                                                           now + (retry_after_s or retry_s)
    DOWN                failed(hub, now, reason)           DOWN (since kept), retry renewed
    UNKNOWN, DOWN       succeeded(hub, now)                UP since now
    UP                  succeeded(hub, now)                UP
    any                 probe_started(hub, now)            probing: not probed again (nor,
                                                           if DOWN, chosen) until its
                                                           succeeded() or failed()

    choose(now)      the nearest hub UNKNOWN or UP; else (partitioned) the nearest DOWN
                     hub whose retry is due and that is not being probed (the batch itself
                     is the probe); else None: wait until next_attempt_at().
    probes_due(now)  DOWN hubs nearer than the chosen one, retry due, not being probed:
                     the caller probes them (a GET /health) beside the batches, so a
                     preferred hub that has gone silent costs a probe's timeout and not
                     a batch's, and one that came back is taken back within `retry_s`.
    next_attempt_at()  when the next of these is due: the caller's timer.

The host is partitioned, with `partitioned_since` the time of the failure that left no
hub UNKNOWN or UP, until any hub succeeds. UNKNOWN is a hub not tried yet: taken as up,
so the nearest one is tried first, but shown as what it is.

Why not the per-endpoint `Breaker` (policy/breaker.py): it trips after `failures` in a
window (the seed: 5 in 60 s) and stays open a fixed `open_s` (30 s), then needs
`successes` probes to close. A hub must be left on its *first* failure (a silent hub is
left within ~1-2 s, the target is 2 s), retried after its own `Retry-After` when it said
so (a full receiver spool), and order among endpoints is the point here: a breaker knows
one endpoint. Set to 1 failure and a 1 s open time it would behave like one hub's row of
this table, minus Retry-After, at the cost of a config object built only to say so.

Time is an argument (`now`, monotonic seconds); nothing here reads a clock, sleeps or
does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

# A failed hub is tried again no sooner than this: a refused connection costs nothing to
# retry, and a hub back from a restart is in use again within a second.
DEFAULT_RETRY_S = 1.0
# A hub's Retry-After is honoured up to this: a receiver that asks for an hour (a bug, or
# a clock in the wrong unit) must not keep the nearest hub out of use for an hour.
MAX_RETRY_AFTER_S = 60.0


class HubState(enum.Enum):
    UNKNOWN = "unknown"  # not tried yet: chosen as if up
    UP = "up"  # its last batch or probe succeeded
    DOWN = "down"  # its last batch or probe failed: retried at `retry_at`


class Hub:
    """One hub's row: its state and the episode it is in."""

    __slots__ = ("name", "rank", "state", "since", "retry_at", "last_error",
                 "failures", "probing")

    def __init__(self, name: str, rank: int):
        self.name = name
        self.rank = rank  # 0: the nearest
        self.state = HubState.UNKNOWN
        self.since: float | None = None  # when it entered its state (None: UNKNOWN)
        self.retry_at = 0.0  # DOWN: not tried again before this
        self.last_error: str | None = None  # outlives the failure, for status
        self.failures = 0  # consecutive failures; 0 once it succeeds
        self.probing = False

    def __repr__(self) -> str:
        return f"<Hub {self.name} {self.state.value}>"


class HubChoice:
    """The ordered hubs of one host and which of them to use."""

    __slots__ = ("hubs", "retry_s", "partitioned_since", "switches", "_by_name", "_current",
                 "_last_used")

    def __init__(self, hubs: Sequence[str], *, retry_s: float = DEFAULT_RETRY_S):
        if not hubs:
            raise ValueError("hub choice needs at least one hub")
        if len(set(hubs)) != len(hubs):
            raise ValueError(f"hubs listed twice: {list(hubs)}")
        if retry_s <= 0:
            raise ValueError(f"retry_s must be > 0, not {retry_s!r}")
        self.hubs = tuple(Hub(name, rank) for rank, name in enumerate(hubs))
        self._by_name = {h.name: h for h in self.hubs}
        self.retry_s = retry_s
        self.partitioned_since: float | None = None
        # Times the hub in use changed (failover, and back): one per move, for metrics.
        self.switches = 0
        self._current: Hub | None = self.hubs[0]
        self._last_used = self.hubs[0]

    # --- decisions -----------------------------------------------------------------

    def choose(self, now: float) -> str | None:
        """The hub for the next batch, or None: nothing may be tried before
        next_attempt_at()."""
        current = self._current
        if current is not None:
            return current.name
        for hub in self.hubs:  # partitioned: the nearest whose retry is due
            if not hub.probing and hub.retry_at <= now:
                return hub.name
        return None

    def probes_due(self, now: float) -> list[str]:
        """Hubs nearer than the one in use that should be probed now."""
        current = self._current
        if current is None:
            return []  # partitioned: choose() tries them with the batch itself
        return [h.name for h in self.hubs[:current.rank]
                if h.state is HubState.DOWN and not h.probing and h.retry_at <= now]

    def next_attempt_at(self) -> float | None:
        """When something is next due: while partitioned, the earliest a hub may be
        tried; else the earliest probe of a nearer hub. None: nothing is (no nearer hub
        is down, or every due hub is being probed and its result will say)."""
        current = self._current
        hubs = self.hubs if current is None else [
            h for h in self.hubs[:current.rank] if h.state is HubState.DOWN]
        due = [h.retry_at for h in hubs if not h.probing]
        return min(due) if due else None

    @property
    def current(self) -> str | None:
        """The hub in use: the nearest UNKNOWN or UP one; None while partitioned."""
        return self._current.name if self._current is not None else None

    # --- events --------------------------------------------------------------------

    def failed(self, hub: str, now: float, reason: str,
               retry_after_s: float | None = None) -> None:
        """A batch or probe to `hub` failed: a refused or reset connection, a timeout, a
        5xx, or an answer that says the hub will never take this batch. `retry_after_s`:
        the hub's own Retry-After, if it gave one."""
        h = self._by_name[hub]
        wait = self.retry_s
        if retry_after_s is not None and retry_after_s > 0:
            wait = min(retry_after_s, MAX_RETRY_AFTER_S)
        if h.state is not HubState.DOWN:
            h.state = HubState.DOWN
            h.since = now
        h.retry_at = now + wait
        h.last_error = reason
        h.failures += 1
        h.probing = False
        self._reconsider(now)

    def succeeded(self, hub: str, now: float) -> None:
        """A batch to `hub` was stored, or a probe of it answered healthy."""
        h = self._by_name[hub]
        if h.state is not HubState.UP:
            h.state = HubState.UP
            h.since = now
        h.failures = 0
        h.probing = False
        h.retry_at = 0.0
        self._reconsider(now)

    def probe_started(self, hub: str, now: float) -> None:
        """A probe of `hub` is in flight: its succeeded() or failed() must follow."""
        self._by_name[hub].probing = True

    # --- reading -------------------------------------------------------------------

    def snapshot(self, now: float) -> dict:
        """What `status` shows: the hub in use, whether (since when) the host is
        partitioned, and every hub's state, nearest first."""
        return {
            "hub": self.current,
            "partitioned_since": self.partitioned_since,
            "switches": self.switches,
            "hubs": [{
                "hub": h.name,
                "state": h.state.value,
                "since": h.since,
                "last_error": h.last_error,
                "failures": h.failures,
                "retry_in_s": (max(0.0, h.retry_at - now)
                               if h.state is HubState.DOWN else None),
                "probing": h.probing,
            } for h in self.hubs],
        }

    # --- the one place the hub in use and the partition change ---------------------

    def _reconsider(self, now: float) -> None:
        current = next((h for h in self.hubs if h.state is not HubState.DOWN), None)
        self._current = current
        if current is None:
            if self.partitioned_since is None:
                self.partitioned_since = now
            return
        self.partitioned_since = None
        if current is not self._last_used:  # a partition in between is not a move
            self.switches += 1
            self._last_used = current

    def __repr__(self) -> str:
        where = self.current or f"partitioned since {self.partitioned_since}"
        return f"<HubChoice {where}>"
