"""What the L7 proxy keeps per upstream: its idle connections, pooled per endpoint and
bounded by `pool_size` (with those agent connections hold), the answers that name it,
the LAST_GOOD cache, and the head caches of `heads`.

Compiled: part of the hot path mypyc compiles (sidecar/compile.py), so its types are
exact, not hints: mypyc checks declared attribute and argument types at run time, and
narrows an attribute after an assignment in a method (read it in another method if a
call in between may change it). The tests run it compiled and interpreted.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Final

from sidecar.config import FallbackKind
from sidecar.metrics import FailureKind
from sidecar.proxy.http.heads import RequestShape
from sidecar.proxy.http.replies import canned, reason_phrase
from sidecar.upstream import Endpoint, Upstream

if TYPE_CHECKING:  # its module imports this one
    from sidecar.proxy.http.upstream_conn import UpstreamConnection

# LAST_GOOD fallback: responses remembered per upstream, and the largest body kept. A
# fallback is for small, read-mostly answers (status, config, registry lookups).
LAST_GOOD_ENTRIES: Final = 256
LAST_GOOD_MAX_BODY_BYTES: Final = 64 * 1024


class UpstreamState:
    """What the L7 proxy keeps per upstream: idle connections per endpoint, canned
    answers naming the upstream, and the LAST_GOOD cache. Holds no reference to the
    Upstream itself, so it lives exactly as long as the Upstream (see `state_of`)."""

    __slots__ = ("policy", "stats", "failure_statuses", "request_timeout_s", "pools", "host_lines", "last_good", "rejection",
                 "static", "timed_out", "connect_timed_out", "bad_gateway", "malformed",
                 "framings", "last_head", "last_known", "last_answer", "last_answer_status",
                 "request_shapes", "request_heads",
                 "whole_heads",
                 "pool_size", "held")

    def __init__(self, upstream: Upstream):
        policy = self.policy = upstream.policy
        self.stats = upstream.stats
        # read per exchange (the policy is a plain dataclass: a slower attribute read)
        self.failure_statuses = policy.failure_statuses
        self.request_timeout_s = policy.request_timeout_s
        name = upstream.name
        self.pools: dict[Endpoint, list[UpstreamConnection]] = {}
        # Idle connections are at most pool_size, pooled or held by an agent connection
        # for its next request (`HttpProxy.held_conn`): idle agents cannot pin more.
        self.pool_size = policy.pool_size
        self.held = 0
        # How this upstream's answers are framed, by the shape of their head: see
        # `UpstreamConnection.on_headers_complete`.
        self.framings: dict[bytes, int | list[tuple[bytes, bytes]]] = {}
        # And the last answer's head as it came, with its verdict: an upstream under load
        # repeats its answers byte for byte until the Date changes, once a second, and
        # comparing two heads is far cheaper than zeroing and hashing one. One entry:
        # a miss costs a failed compare, never a dict (measured: bench/l7_instructions).
        self.last_head = b""
        self.last_known: int | list[tuple[bytes, bytes]] = 0
        # And the last whole answer that went to its agent as it came (head and
        # Content-Length body in one read), with its status: the same bytes again are
        # not parsed again (see `UpstreamConnection._repeated`).
        self.last_answer = b""
        self.last_answer_status = 0
        # The same for requests' fields: see `request_known`; and by the fields
        # themselves, for requests without a body (see `HttpProxy.on_headers_complete`).
        self.request_shapes: dict[bytes, RequestShape] = {}
        self.request_heads: dict[bytes, RequestShape] = {}
        # And whole requests without a body, as a read brings them (request line and
        # fields, byte for byte): an agent polling an endpoint sends the same bytes
        # every time, and then there is nothing to search. -> (method, target, the
        # fields to forward). Only keep-alive HTTP/1.1 requests that need nothing else.
        self.whole_heads: dict[bytes, tuple[bytes, bytes, bytes]] = {}
        self.host_lines = {ep: b"Host: %s\r\n" % ep.label.encode() for ep in upstream.endpoints}
        fallback = policy.fallback
        self.last_good: OrderedDict[bytes, bytes] | None = (
            OrderedDict() if fallback.kind is FallbackKind.LAST_GOOD else None)
        breakers = ", ".join(ep.breaker.name for ep in upstream.endpoints)
        self.rejection = canned(
            503, "Service Unavailable", f"agentvisor: circuit breaker open for {name}",
            b"X-Agentvisor-Breaker: %s\r\nRetry-After: %d\r\n"
            % (breakers.encode(), math.ceil(policy.breaker.open_s)))
        self.static = b"".join((
            b"HTTP/1.1 %d %s\r\n" % (fallback.status, reason_phrase(fallback.status)),
            b"Content-Type: %s\r\n" % fallback.content_type.encode(),
            b"Content-Length: %d\r\n" % len(fallback.body),
            b"X-Agentvisor-Fallback: static\r\n\r\n", fallback.body))
        self.timed_out = canned(504, "Gateway Timeout", f"agentvisor: {name} gave no "
                                 f"response within {policy.request_timeout_s:g} s")
        self.connect_timed_out = canned(504, "Gateway Timeout", f"agentvisor: no "
                                         f"connection to {name} within "
                                         f"{policy.connect_timeout_s:g} s")
        self.bad_gateway = canned(502, "Bad Gateway",
                                   f"agentvisor: {name} refused or dropped the connection")
        self.malformed = canned(502, "Bad Gateway",
                                 f"agentvisor: {name} sent a response that is not HTTP/1.1")

    def failure_reply(self, kind: FailureKind) -> bytes:
        if kind is FailureKind.CONNECT_TIMEOUT:
            return self.connect_timed_out
        if kind is FailureKind.MALFORMED:
            return self.malformed
        return self.bad_gateway

    def checkout(self, ep: Endpoint) -> UpstreamConnection | None:
        """The most recently used idle connection to `ep` that is still open."""
        pool = self.pools.get(ep)
        while pool:
            conn = pool.pop()
            transport = conn.transport
            if not conn.dead and transport is not None and not transport.is_closing():
                return conn
        return None

    def checkin(self, conn: UpstreamConnection) -> None:
        pool = self.pools.get(conn.endpoint)
        if pool is None:
            pool = self.pools[conn.endpoint] = []
        if conn.dead or len(pool) + self.held >= self.pool_size:
            conn.close()
            return
        if conn.reading_paused:  # an idle connection must read, to see the upstream close
            conn.resume_reading()
        pool.append(conn)

    def remember(self, target: bytes, response: bytes) -> None:
        cache = self.last_good
        assert cache is not None  # only LAST_GOOD upstreams remember
        cache[target] = response
        cache.move_to_end(target)
        if len(cache) > LAST_GOOD_ENTRIES:
            cache.popitem(last=False)


def state_of(upstream: Upstream) -> UpstreamState:
    """The L7 state of `upstream`, made on first use. It hangs on the Upstream (opaque
    to it), so an Upstream the router forgets takes its pools and cache with it."""
    state = upstream.l7_state
    if state is None:
        state = upstream.l7_state = UpstreamState(upstream)
    return state


