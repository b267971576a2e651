"""The proxy's own metrics: counted on the hot path in plain Python objects, turned into
Prometheus metric families only when someone scrapes.

The one idea: the hot path pays for an integer increment and nothing else. A
prometheus_client Histogram takes a lock on every `observe()`, which costs more than the
proxying it would measure; here a request adds to a list of counts (a scan from the
bucket), and `SidecarCollector` builds cumulative buckets, label sets and breaker states
at scrape time. One event loop owns the counters, so they need no lock; a scrape from
another thread copies each container with one C-level call before reading it.

Names (prefix agentvisor_sidecar_): requests_total{upstream,outcome},
request_duration_seconds{upstream}, failures_total{upstream,endpoint,kind},
retries_total{upstream}, retries_denied_total{upstream}, active_requests{upstream},
breaker_state{breaker,upstream} (0 closed, 1 half-open, 2 open),
breaker_trips_total{breaker,upstream}, breaker_rejections_total{breaker,upstream}.
Label names are declared in sorted order: the exposition reads the same whichever way
the client library orders them.

Series stay bounded however many destinations agents reach: declared upstreams always
have their own; of the undeclared (pass-through) ones, the `MAX_PASS_THROUGH_SERIES`
most telling (an open breaker, then the most recently used) have theirs, and the rest
are summed under `upstream="(other)"` (endpoint and breaker too), so totals stay exact.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any, Callable, Final, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

from sidecar.policy.breaker import BreakerState

if TYPE_CHECKING:  # upstream.py imports this module
    from sidecar.upstream import Upstream


class FailureKind(enum.Enum):
    REFUSED = "refused"  # connection refused
    CONNECT_TIMEOUT = "connect_timeout"
    RESET = "reset"  # connection reset or closed mid-exchange
    TIMEOUT = "timeout"  # L7: no complete response within request_timeout_s
    IDLE_TIMEOUT = "idle_timeout"  # L4: no byte either way within idle_timeout_s
    STATUS = "status"  # L7: a response status listed in failure_statuses
    MALFORMED = "malformed"  # L7: the upstream's response is not HTTP we can relay


class Outcome(enum.Enum):
    OK = "ok"  # relayed (a 4xx the upstream chose to send is OK for the proxy)
    FAILED = "failed"  # the agent got an error the upstream caused
    REJECTED = "rejected"  # refused by an open breaker, no fallback
    FALLBACK = "fallback"  # the breaker was open; a fallback response was served
    BAD_REQUEST = "bad_request"  # the agent's request was not HTTP we serve
    CANCELLED = "cancelled"  # the agent left or stopped reading before its answer was in


_OK: Final = Outcome.OK  # read per request


# Seconds. A LAN round trip through the proxy takes well under a millisecond; the agents'
# own calls take up to the 10 s request timeout, so the buckets span both ends.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                     5, 10)
_FIRST_BOUND: Final = float(LATENCY_BUCKETS_S[0])
_LATER_BOUNDS: Final = tuple([float(b) for b in LATENCY_BUCKETS_S[1:]])
_BUCKET_LABELS = tuple(floatToGoString(b) for b in LATENCY_BUCKETS_S) + ("+Inf",)

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "agentvisor_sidecar_"

# Undeclared destinations with series of their own: enough to see the few an agent
# really uses; the rest of a port scan folds into OTHER instead of thousands of series.
MAX_PASS_THROUGH_SERIES = 20
OTHER = "(other)"

BREAKER_STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1,
                        BreakerState.OPEN: 2}


class UpstreamStats:
    """Counters of one upstream. Keys are the enums' values (str): an Enum member's hash
    is a Python-level call, a str's is cached."""

    __slots__ = ("upstream", "active", "ok", "not_ok", "first_bucket", "later_buckets",
                 "duration_sum", "failures", "retries", "retries_denied")

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.active = 0  # in-flight requests (L7) / connections (L4); callers += 1 / -= 1
        # Requests by outcome: OK apart, since nearly every request is one (an integer
        # increment; the others a dict's). Read them all as `outcomes`.
        self.ok = 0
        self.not_ok: dict[str, int] = {o.value: 0 for o in Outcome if o is not Outcome.OK}
        # Per-bucket (not cumulative) counts, read as `buckets`. The first bucket, where
        # nearly every request lands, is an integer of its own (its += is native; a list
        # item's is a generic add on boxed ints); the later ones end with +Inf.
        self.first_bucket = 0
        self.later_buckets = [0] * len(LATENCY_BUCKETS_S)
        self.duration_sum = 0.0
        self.failures: dict[tuple[str, str], int] = {}  # (endpoint, kind value) -> count
        self.retries = 0
        self.retries_denied = 0

    def done(self, outcome: Outcome, duration_s: float) -> None:
        """One request (L7) or connection (L4) finished."""
        if outcome is _OK:
            self.ok += 1
        else:
            self.not_ok[outcome._value_] += 1
        # The first bucket whose bound is at or above the duration (le).
        if duration_s <= _FIRST_BOUND:
            self.first_bucket += 1
        else:
            i = 0
            for bound in _LATER_BOUNDS:
                if duration_s <= bound:
                    break
                i += 1
            later = self.later_buckets
            later[i] = later[i] + 1  # typed: a native add (`+=` on an item is generic)
        self.duration_sum += duration_s

    @property
    def buckets(self) -> list[int]:
        """Per-bucket (not cumulative) counts, one per LATENCY_BUCKETS_S bound and +Inf."""
        return [self.first_bucket, *self.later_buckets]

    @property
    def outcomes(self) -> dict[str, int]:
        """Requests finished, by outcome value (a copy)."""
        return {_OK.value: self.ok, **self.not_ok}

    def failed(self, kind: FailureKind, endpoint: str) -> None:
        """One failure seen (a request with retries may see several)."""
        key = (endpoint, kind._value_)
        failures = self.failures
        failures[key] = failures.get(key, 0) + 1

    def retried(self) -> None:
        self.retries += 1

    def retry_denied(self) -> None:
        """A retry that was safe but the budget refused."""
        self.retries_denied += 1

    @property
    def count(self) -> int:
        """Requests observed by the histogram (derived, so it always equals +Inf)."""
        return sum(self.buckets)


class SidecarCollector:
    """A prometheus_client collector over the live upstreams: register it once, and each
    scrape reads the counters and asks each breaker its state at the scrape's time."""

    def __init__(self, upstreams: Callable[[], Iterable["Upstream"]],
                 clock: Callable[[], float] = time.monotonic):
        self._upstreams = upstreams
        self._clock = clock

    def describe(self) -> Iterator[Metric]:
        """The families with no samples: lets a registry check names without a scrape."""
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        (requests, duration, failures, retries, denied, active, state, trips,
         rejections) = fams = _families()
        listed = self._upstreams()
        ups = list(listed)
        # The router's `Destinations` says how many lead the list as declared; any other
        # iterable is taken as all declared (every upstream its own series).
        declared: int = getattr(listed, "declared", len(ups))
        own = declared + MAX_PASS_THROUGH_SERIES
        for up in ups[:own]:
            stats = up.stats
            name = up.name
            outcomes = dict(stats.outcomes)
            for o in Outcome:
                requests.add_metric([o.value, name], outcomes.get(o.value, 0))
            duration.add_metric([name], _cumulative(list(stats.buckets)), stats.duration_sum)
            for (endpoint, kind), n in sorted(list(stats.failures.items())):
                failures.add_metric([endpoint, kind, name], n)
            retries.add_metric([name], stats.retries)
            denied.add_metric([name], stats.retries_denied)
            active.add_metric([name], stats.active)
            for b in up.breakers():
                labels = [b.name, name]
                state.add_metric(labels, BREAKER_STATE_VALUES[b.state_at(now)])
                trips.add_metric(labels, b.trips)
                rejections.add_metric(labels, b.rejections)
        if len(ups) > own:
            self._collect_other(ups[own:], fams)
        return iter(fams)

    def _collect_other(self, ups: list["Upstream"], fams: tuple[Any, ...]) -> None:
        """The sum of `ups` under OTHER. No breaker_state: a state does not add up."""
        (requests, duration, failures, retries, denied, active, _state, trips,
         rejections) = fams
        outcomes = {o.value: 0 for o in Outcome}
        counts = [0] * len(_BUCKET_LABELS)
        by_kind: dict[str, int] = {}
        duration_sum = 0.0
        n_retries = n_denied = n_active = n_trips = n_rejections = 0
        for up in ups:
            stats = up.stats
            for outcome, n in stats.outcomes.items():
                outcomes[outcome] += n
            for i, n in enumerate(list(stats.buckets)):
                counts[i] += n
            duration_sum += stats.duration_sum
            for (_endpoint, kind), n in list(stats.failures.items()):
                by_kind[kind] = by_kind.get(kind, 0) + n
            n_retries += stats.retries
            n_denied += stats.retries_denied
            n_active += stats.active
            for b in up.breakers():
                n_trips += b.trips
                n_rejections += b.rejections
        for o in Outcome:
            requests.add_metric([o.value, OTHER], outcomes[o.value])
        duration.add_metric([OTHER], _cumulative(counts), duration_sum)
        for kind, n in sorted(by_kind.items()):
            failures.add_metric([OTHER, kind, OTHER], n)
        retries.add_metric([OTHER], n_retries)
        denied.add_metric([OTHER], n_denied)
        active.add_metric([OTHER], n_active)
        trips.add_metric([OTHER, OTHER], n_trips)
        rejections.add_metric([OTHER, OTHER], n_rejections)


def _cumulative(counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts -> Prometheus's cumulative (le, count) pairs."""
    total, buckets = 0, []
    for label, n in zip(_BUCKET_LABELS, counts):
        total += n
        buckets.append((label, total))
    return buckets


def _families() -> tuple[Any, ...]:  # the families' own types, by position
    up, upb = ["upstream"], ["breaker", "upstream"]
    return (
        CounterMetricFamily(PREFIX + "requests", "Requests (L7) or connections (L4) "
                            "finished, by outcome.", labels=["outcome", "upstream"]),
        HistogramMetricFamily(PREFIX + "request_duration_seconds", "Time from the "
                              "agent's request to the end of the answer, as the proxy saw "
                              "it (L4: connection lifetime).", labels=up),
        CounterMetricFamily(PREFIX + "failures", "Upstream failures seen, by endpoint and "
                            "kind (a retried request may count several).",
                            labels=["endpoint", "kind", "upstream"]),
        CounterMetricFamily(PREFIX + "retries", "Retries sent.", labels=up),
        CounterMetricFamily(PREFIX + "retries_denied", "Safe retries refused by the "
                            "retry budget.", labels=up),
        GaugeMetricFamily(PREFIX + "active_requests", "Requests (L7) or connections (L4) "
                          "in flight.", labels=up),
        GaugeMetricFamily(PREFIX + "breaker_state", "Circuit breaker state: 0 closed, "
                          "1 half-open, 2 open.", labels=upb),
        CounterMetricFamily(PREFIX + "breaker_trips", "Times the breaker opened "
                            "(automatic or by an operator).", labels=upb),
        CounterMetricFamily(PREFIX + "breaker_rejections", "Calls refused by an open or "
                            "half-open breaker.", labels=upb),
    )


def render(registry) -> bytes:
    """The registry in Prometheus text format; serve it with CONTENT_TYPE."""
    return generate_latest(registry)
