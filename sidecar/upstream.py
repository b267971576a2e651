"""One upstream at run time: its endpoints (nearest first), a breaker per endpoint, its
retry budget and its statistics. Shared by the L4 relay and the L7 proxy, so both choose
endpoints and count failures the same way.

The hot path asks only `choose(now)`: the first endpoint whose breaker admits the call.
Policy arithmetic stays in `policy/`.
"""

from __future__ import annotations

from typing import Any

from sidecar.config import UpstreamPolicy
from sidecar.metrics import UpstreamStats
from sidecar.policy.breaker import Breaker, BreakerState
from sidecar.policy.retry import RetryBudget


class Endpoint:
    __slots__ = ("host", "port", "label", "breaker")

    def __init__(self, upstream: str, host: str, port: int, policy: UpstreamPolicy):
        self.host = host
        self.port = port
        self.label = f"{host}:{port}"
        # A breaker is named after what an operator types: "Upstream" when there is one
        # endpoint, "Upstream/host:port" when there are several.
        name = upstream if len(policy.endpoints) == 1 else f"{upstream}/{self.label}"
        self.breaker = Breaker(name, policy.breaker)


class Upstream:
    def __init__(self, policy: UpstreamPolicy):
        self.policy = policy
        self.name = policy.name
        self.endpoints = [Endpoint(policy.name, h, p, policy) for h, p in policy.endpoints]
        self.stats = UpstreamStats(policy.name)
        self.retry_budget = RetryBudget(policy.retry)
        # What the L7 proxy keeps for this upstream (pools, caches): its own business,
        # kept here so that it lives exactly as long as the Upstream.
        self.l7_state: Any = None

    def choose(self, now: float) -> Endpoint | None:
        """The nearest endpoint whose breaker admits a call now; None if all are open.

        An admitted call must be followed by exactly one `breaker.record(...)` or
        `breaker.release()` on the endpoint returned (half-open counts its probes)."""
        for ep in self.endpoints:
            if ep.breaker.allow(now):
                return ep
        return None

    def breakers(self) -> list[Breaker]:
        return [ep.breaker for ep in self.endpoints]

    def is_open(self, now: float) -> bool:
        return all(b.state_at(now) is BreakerState.OPEN for b in self.breakers())
